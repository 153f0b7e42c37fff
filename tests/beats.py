"""Real ``hookgate beat`` processes for tests, and the task messages they send, read off the queues."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from kombu import Connection

from schemas.settings import Settings
from tests.workers import Hookgate, wait_until

__all__ = ["drain_task_messages", "running_beat"]


@contextmanager
def running_beat(settings: Settings, log_path: Path) -> Iterator[Hookgate]:
    """``hookgate beat`` until the block ends (SIGTERM, then SIGKILL); started once it logs about the lock."""
    beat = Hookgate(settings, log_path, "beat").start()
    try:
        wait_until(lambda: "beat_lock_" in beat.log_text(), "beat to try the lock", timeout_s=20)
        yield beat
    finally:
        beat.stop()


def drain_task_messages(broker_url: str, queue: str) -> list[tuple[float, str]]:
    """Take every message beat left in ``queue``: (when it was sent, task name), in queue order.

    The time comes from the message: beat sets each entry's ``expires`` a fixed interval after the send
    (``consumers.beat``), so differences between those are differences between sends, however late the
    test reads them.
    """
    taken: list[tuple[float, str]] = []
    with Connection(broker_url) as conn:
        channel = conn.default_channel
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            headers = message.headers or {}
            taken.append((datetime.fromisoformat(headers["expires"]).timestamp(), str(headers["task"])))
    return taken
