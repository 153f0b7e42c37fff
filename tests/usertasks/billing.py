"""A custom task route's task: what the README's "Creating a new task" builds, with switches for the tests."""

from __future__ import annotations

import os
import time
from typing import Any

import structlog

from consumers.tasks.custom import PermanentError, delivery_task, load_event

logger = structlog.get_logger(__name__)


@delivery_task(name="usertasks.billing.handle_invoice", soft_time_limit=2, time_limit=5)
def handle_invoice(event_id: str, delivery_id: str) -> dict[str, Any]:
    """Handle an invoice event: fail, fail for good or overrun the time limit when the event asks to."""
    event = load_event(delivery_id)
    data = event["data"]
    logger.info("handling invoice", invoice=data.get("invoice_id"))
    if data.get("fail") == "transient":
        raise RuntimeError("the invoice service is down")
    if data.get("fail") == "permanent":
        raise PermanentError(f"invoice {data.get('invoice_id')} is not ours")
    if data.get("sleep_s"):
        time.sleep(float(data["sleep_s"]))
    # Which worker ran it: the test checks that only the billing queue's worker did.
    return {"event_id": event_id, "invoice": data.get("invoice_id"), "type": event["type"],
            "worker": os.environ.get("TEST_WORKER_ROLE", "")}
