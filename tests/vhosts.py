"""RabbitMQ vhosts made for a test and deleted after it, so no test sees another's messages."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

RABBIT_HOST = os.environ.get("HOOKGATE_TEST_RABBIT_HOST", "127.0.0.1")


def _rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.fail("rabbitmqctl is not installed: the integration tests need a real RabbitMQ (run scripts/setup.sh)")
    result = subprocess.run([ctl, *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed: {result.stderr or result.stdout}")


@contextmanager
def fresh_vhost() -> Iterator[str]:
    """A broker URL on a vhost of its own, deleted with everything in it on exit."""
    vhost = f"hookgate-test-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://guest:guest@{RABBIT_HOST}:5672/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)
