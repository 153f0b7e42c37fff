"""RabbitMQ restarted mid-load, on a private node (tests/rabbitnode.py): the shared broker is never restarted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.rabbitnode import RabbitNode
from tests.reliability.harness import Load, check_drained, reliability_settings, running_stack
from tests.workers import wait_until

# Several processes on a busy 2-core machine: more room than the suite default of 120 s.
pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]


@pytest.fixture
def rabbit_node(tmp_path: Path) -> Iterator[RabbitNode]:
    with RabbitNode(tmp_path / "rabbit") as node:
        yield node


def test_rabbitmq_killed_and_restarted_mid_load_loses_no_accepted_event(rabbit_node: RabbitNode, sqlite_url: str,
                                                             tmp_path: Path) -> None:
    """RabbitMQ SIGKILLed mid-load, then started on its data: while it is down the gateway answers 503, never
    202; clients that retry get in; every accepted event is delivered."""
    settings = reliability_settings(rabbit_node.url, sqlite_url)
    with running_stack(settings, tmp_path) as stack:
        load = Load(stack, 1500, rate_per_s=150, give_up_s=90).start()
        load.wait_accepted(300)
        # A crash, not `rabbitmqctl stop`: a clean stop under load took 17 s here, longer than the load.
        rabbit_node.kill()
        accepted_at_stop = len(load.accepted)
        # The gateway says so: not ready, and events are refused with a 503 asking for a retry.
        wait_until(lambda: load.unavailable >= 20, "clients told to retry")
        readyz = httpx.get(f"{stack.base_url}/readyz")
        assert readyz.status_code == 503, readyz.text
        # Nothing is accepted while the broker is down: a 202 without its confirm would be a lie.
        assert len(load.accepted) <= accepted_at_stop + load.clients  # at most the requests in flight at the stop
        rabbit_node.start()
        load.join(timeout_s=120)
        check_drained(stack, load, "RabbitMQ SIGKILLed mid-load, then started again", timeout_s=120)
