"""The baseline for slow receivers: webhooks sent the way the Celery guide sends them.

One ``send_webhook.delay(url, event)`` per event, one blocking POST per task, Celery's default
settings (prefork with one child per core, prefetch 4, early acks).
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from celery import Celery

app = Celery("celery_guide", broker=os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))


@app.task
def send_webhook(url: str, event: dict[str, Any]) -> int:
    response = httpx.post(url, json={"type": event["type"], "data": event["data"]}, timeout=10)
    return response.status_code
