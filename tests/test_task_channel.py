"""Custom task routes end to end: `hookgate serve`, `router`, a worker for the billing queue and one for the others.

The task is tests/usertasks/billing.py, loaded through HOOKGATE_TASK_MODULES by every worker; only
the billing queue's worker may run it. Both stores.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from amqp.exceptions import NotFound
from celery import Celery
from celery.result import AsyncResult
from kombu import Connection

from consumers.celery_app import make_celery
from consumers.topology import task_queue
from schemas.ids import new_id
from schemas.settings import Settings
from tests.channel_seeding import add_channel_subscription, add_event_delivery
from tests.channel_stack import ChannelStack

TASK = "usertasks.billing.handle_invoice"


@pytest.fixture(scope="module")
def stack(broker_url: str, module_store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChannelStack]:
    settings = Settings(broker_url=broker_url, database_url=module_store_url, retry_schedule=(0, 1, 1),
                        subscription_cache_ttl_s=0.2, router_batch_wait_s=0.01,
                        task_modules=("tests.usertasks.billing",))  # type: ignore[arg-type]
    with ChannelStack(settings, tmp_path_factory.mktemp("task-channel"),
                      workers={"billing": "billing", "other": "webhooks,email"}) as running:
        yield running


@pytest.fixture(scope="module")
def subscription_id(stack: ChannelStack) -> str:
    response = stack.api.post("/v1/subscriptions", json={"channel": "task", "task": TASK, "queue": "billing",
                                                         "event_types": ["invoice.*"]})
    assert response.status_code == 201, response.text
    assert response.json()["options"] == {"task": TASK, "queue": "billing"}
    stack.wait_for_subscriptions()
    return str(response.json()["id"])


def _post_event(stack: ChannelStack, data: dict[str, Any], event_type: str = "invoice.created") -> str:
    response = stack.api.post("/v1/events", json={"type": event_type, "source": "billing-tests", "data": data})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _delivery_of(stack: ChannelStack, event_id: str, status: str, timeout_s: float = 20.0) -> dict[str, Any]:
    """The event's one delivery with its attempts, once it reaches ``status``."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = stack.api.get(f"/v1/events/{event_id}", params={"source": "billing-tests"})
        if response.status_code == 200 and response.json()["deliveries"]:
            (delivery,) = response.json()["deliveries"]
            if delivery["status"] == status:
                return dict(stack.api.get(f"/v1/deliveries/{delivery['id']}").json())
        if time.monotonic() > deadline:
            raise AssertionError(f"event {event_id} has no {status} delivery: {response.text}\n{stack.logs()}")
        time.sleep(0.1)


def test_events_from_http_and_amqp_reach_the_task_on_its_own_queue(stack: ChannelStack, subscription_id: str) -> None:
    """An event POSTed and one published to RabbitMQ each run the task once, with the event id, on the billing
    queue's worker only; the return value is recorded as the attempt's response."""
    http_event = _post_event(stack, {"invoice_id": "inv-1"})
    amqp_event = f"amqp-{new_id()}"
    stack.publish_amqp({"type": "invoice.paid", "source": "billing-tests", "data": {"invoice_id": "inv-2"}},
                       message_id=amqp_event)
    ignored = _post_event(stack, {"invoice_id": "inv-3"}, event_type="order.created")

    deliveries = [_delivery_of(stack, event_id, "succeeded") for event_id in (http_event, amqp_event)]

    for delivery, event_id, invoice, event_type in zip(deliveries, (http_event, amqp_event), ("inv-1", "inv-2"),
                                                       ("invoice.created", "invoice.paid"), strict=True):
        (attempt,) = delivery["attempts"]
        assert orjson.loads(attempt["response_body"]) == {"event_id": event_id, "invoice": invoice,
                                                          "type": event_type, "worker": "billing"}
        assert delivery["subscription_id"] == subscription_id
    assert stack.api.get(f"/v1/events/{ignored}", params={"source": "billing-tests"}).json()["deliveries"] == []
    assert TASK not in stack.workers["other"].log_text()


def test_a_failing_task_is_retried_recorded_and_dead_when_the_schedule_is_spent(
        stack: ChannelStack, subscription_id: str) -> None:
    """A task that raises is retried on the schedule, each attempt recorded with the error, then dead; a manual
    retry through the deliveries API runs it again on a fresh schedule."""
    event_id = _post_event(stack, {"invoice_id": "inv-down", "fail": "transient"})
    delivery = _delivery_of(stack, event_id, "dead")

    assert [a["number"] for a in delivery["attempts"]] == [1, 2, 3]
    assert {a["error"] for a in delivery["attempts"]} == {"RuntimeError: the invoice service is down"}
    assert delivery["last_error"] == "RuntimeError: the invoice service is down"

    retried = stack.api.post(f"/v1/deliveries/{delivery['id']}/retry")
    assert retried.status_code == 202, retried.text
    deadline = time.monotonic() + 20
    while len(stack.api.get(f"/v1/deliveries/{delivery['id']}").json()["attempts"]) < 6:
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.1)
    assert _delivery_of(stack, event_id, "dead")["attempts_count"] == 6


def test_a_permanent_error_is_dead_at_once(stack: ChannelStack, subscription_id: str) -> None:
    """PermanentError from the task ends the delivery dead after one attempt, with its message as the reason."""
    event_id = _post_event(stack, {"invoice_id": "inv-x", "fail": "permanent"})
    delivery = _delivery_of(stack, event_id, "dead")

    assert [(a["number"], a["error"]) for a in delivery["attempts"]] == [(1, "invoice inv-x is not ours")]


def test_the_soft_time_limit_fails_the_attempt_and_it_is_retried(stack: ChannelStack, subscription_id: str) -> None:
    """A task overrunning its soft time limit (2 s) is a failed attempt like any other, retried on the schedule."""
    event_id = _post_event(stack, {"invoice_id": "inv-slow", "sleep_s": 4})
    delivery = _delivery_of(stack, event_id, "dead", timeout_s=40)

    assert [a["number"] for a in delivery["attempts"]] == [1, 2, 3]
    assert all(a["error"].startswith("SoftTimeLimitExceeded") for a in delivery["attempts"])
    assert all(1500 < a["duration_ms"] < 4000 for a in delivery["attempts"])


def test_a_task_called_directly_has_its_status_in_the_result_backend(stack: ChannelStack) -> None:
    """Sending the task by hand (ids, on its queue) and asking AsyncResult gives SUCCESS and the attempt's outcome."""
    # Another event type: the router must not route the other tests' events to it.
    subscription = add_channel_subscription(stack.sessions, {"channel": "task", "task": TASK, "queue": "billing",
                                                             "event_types": ["direct.*"]})
    event, delivery_id = add_event_delivery(stack.sessions, subscription, {"invoice_id": "inv-direct"},
                                            event_type="invoice.created")
    sender: Celery = make_celery(stack.settings)
    try:
        sent = sender.send_task(TASK, args=[event.id, delivery_id], queue="billing")
        outcome = sent.get(timeout=20)
        state = AsyncResult(sent.id, app=sender).state
    finally:
        sender.close()

    assert state == "SUCCESS"
    assert outcome == {"delivery_id": delivery_id, "attempt": 1, "status": "succeeded", "status_code": None,
                       "error": None}


def test_the_router_declares_a_new_task_queue_before_its_first_publish(stack: ChannelStack) -> None:
    """A task route to a queue no worker has declared yet: the router declares it (durable, quorum, bound on
    hookgate.tasks by its name) and the task message waits there for the queue's first worker."""
    response = stack.api.post("/v1/subscriptions", json={"channel": "task", "task": TASK, "queue": "ledger",
                                                         "event_types": ["ledger.*"]})
    assert response.status_code == 201, response.text
    stack.wait_for_subscriptions()
    event_id = _post_event(stack, {"invoice_id": "inv-ledger"}, event_type="ledger.entry")

    with Connection(stack.settings.broker_url) as connection:
        channel = connection.channel()
        deadline = time.monotonic() + 20
        while True:
            try:
                # Passive: the test must not create the queue itself.
                waiting = channel.queue_declare("ledger", passive=True).message_count
            except NotFound:
                waiting, channel = 0, connection.channel()
            if waiting:
                break
            assert time.monotonic() < deadline, f"no task message in queue ledger\n{stack.logs()}"
            time.sleep(0.1)
        # Declared again with the arguments the router must have used: any other would be refused (406).
        task_queue("ledger").bind(channel).declare()
        message = channel.basic_get("ledger", no_ack=True)
    assert waiting == 1
    assert message.headers["task"] == TASK
    delivery = stack.api.get(f"/v1/events/{event_id}", params={"source": "billing-tests"}).json()["deliveries"]
    assert orjson.loads(message.body)[0] == [event_id, delivery[0]["id"]]
