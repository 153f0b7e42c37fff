"""Secret rotation through the API, verified by real receivers fed by a real worker, on both stores."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import select
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from consumers.store.database import utcnow
from consumers.store.models import Subscription
from schemas.events import CloudEvent
from schemas.ids import new_id
from schemas.keys import Scope
from schemas.settings import Settings
from tests.apiclient import assert_problem
from tests.delivery_stack import DeliveryStack, delivery_stack
from tests.receiver import Received, Receiver, make_secret

# Short enough to wait out in a test, long enough for one delivery to be signed inside it.
GRACE_S = 3.0
KNOWN_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture(scope="module")
async def stack(broker_url: str, module_store_url: str,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DeliveryStack]:
    settings = Settings(broker_url=broker_url, database_url=module_store_url, allow_private_targets=True,
                        secret_rotation_grace_s=GRACE_S, retry_schedule=(0,))  # type: ignore[arg-type]
    async with delivery_stack(settings, tmp_path_factory.mktemp("worker")) as running:
        yield running




async def subscribe(stack: DeliveryStack, url: str, secret: str) -> str:
    body = {"event_types": ["order.*"], "url": url, "secret": secret}
    response = await stack.client.post("/v1/subscriptions", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def rotate(stack: DeliveryStack, subscription_id: str, **body: Any) -> dict[str, Any]:
    response = await stack.client.post(f"/v1/subscriptions/{subscription_id}/rotate-secret",
                                         json=body or None)
    assert response.status_code == 200, response.text
    return dict(response.json())


def order_event() -> CloudEvent:
    return CloudEvent(id=new_id(), source="tests/rotation", type="order.created", data={"order": 7})


def verifies(received: Received, secret: str) -> bool:
    """Whether the standardwebhooks reference library accepts the request with this secret."""
    try:
        Webhook(secret).verify(received.body, received.headers, json_parse=False)
    except WebhookVerificationError:
        return False
    return True


async def test_both_secrets_sign_during_the_grace_period_then_only_the_new_one(
    stack: DeliveryStack
) -> None:
    """Before: the old secret verifies. During the grace period: old and new both do. After it: only the new one."""
    old = make_secret()
    with Receiver(old) as receiver:
        subscription_id = await subscribe(stack, receiver.url, old)
        stack.deliver(subscription_id, order_event())
        receiver.wait_for(1)
        rotated = await rotate(stack, subscription_id)
        new, expires_at = rotated["secret"], datetime.fromisoformat(rotated["previous_secret_expires_at"])
        stack.deliver(subscription_id, order_event())
        receiver.wait_for(2)
        # Wait out the grace period to the instant the API announced, then send once more.
        await asyncio.sleep(max(0.0, (expires_at - utcnow()).total_seconds()) + 0.05)
        stack.deliver(subscription_id, order_event())
        before, during, after = receiver.wait_for(3)
    assert new != old and new.startswith("whsec_")
    assert int(during.headers["webhook-timestamp"]) < expires_at.timestamp()
    assert [(r.verified, verifies(r, new)) for r in (before, during, after)] == [
        (True, False), (True, True), (False, True)
    ]
    assert [len(r.headers["webhook-signature"].split(" ")) for r in (before, during, after)] == [1, 2, 1]


async def test_secrets_are_never_listed_nor_logged(stack: DeliveryStack,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """After a rotation neither secret is in list or read answers, the gateway's output, or the worker's log."""
    old = make_secret()
    with Receiver(old) as receiver:
        subscription_id = await subscribe(stack, receiver.url, old)
        new = (await rotate(stack, subscription_id))["secret"]
        stack.deliver(subscription_id, order_event())
        receiver.wait_for(1)
    listed = await stack.client.get("/v1/subscriptions", params={"limit": 200})
    shown = await stack.client.get(f"/v1/subscriptions/{subscription_id}")
    secret = await stack.client.get(f"/v1/subscriptions/{subscription_id}/secret")
    assert subscription_id in listed.text and shown.status_code == 200
    texts = {"list": listed.text, "read": shown.text, "gateway output": capfd.readouterr().out,
             "worker log": stack.worker.log_text()}
    assert [where for where, text in texts.items() if old in text or new in text] == []
    assert secret.json()["secret"] == new
    assert datetime.fromisoformat(secret.json()["previous_secret_expires_at"]) > utcnow()


async def test_a_given_secret_replaces_the_current_one(stack: DeliveryStack) -> None:
    """A body with a `whsec_` secret sets that one; a second rotation keeps only the secret just replaced."""
    first = make_secret()
    subscription_id = await subscribe(stack, "http://127.0.0.1:9/hook", first)
    second = (await rotate(stack, subscription_id))["secret"]
    assert (await rotate(stack, subscription_id, secret=KNOWN_SECRET))["secret"] == KNOWN_SECRET
    with stack.gateway.sessions() as session:
        row = session.execute(select(Subscription).where(Subscription.id == subscription_id)).scalar_one()
    assert (row.secret, row.previous_secret) == (KNOWN_SECRET, second)


@pytest.mark.parametrize(
    ("body", "status"),
    [({"secret": "not-a-secret"}, 422), ({"secret": KNOWN_SECRET, "grace_s": 5}, 422), ("[]", 422), ("{", 400)],
)
async def test_a_bad_rotation_changes_nothing(stack: DeliveryStack, body: Any,
                                              status: int) -> None:
    """An invalid secret, an unknown field or a malformed body gets a problem and the secret stays."""
    secret = make_secret()
    subscription_id = await subscribe(stack, "http://127.0.0.1:9/hook", secret)
    content = body if isinstance(body, str) else None
    response = await stack.client.post(
        f"/v1/subscriptions/{subscription_id}/rotate-secret", content=content,
        json=None if content else body, headers={"content-type": "application/json"},
    )
    assert_problem(response, status)
    current = await stack.client.get(f"/v1/subscriptions/{subscription_id}/secret")
    assert current.json() == {"secret": secret, "previous_secret_expires_at": None}


async def test_rotation_needs_the_scope_and_a_live_subscription(stack: DeliveryStack) -> None:
    """Without the subscriptions scope: 403; an unknown or deleted subscription: 404."""
    subscription_id = await subscribe(stack, "http://127.0.0.1:9/hook", make_secret())
    path = f"/v1/subscriptions/{subscription_id}/rotate-secret"
    assert_problem(await stack.client.post(path, headers=stack.gateway.auth(Scope.EVENTS_WRITE)), 403)
    assert (await stack.client.delete(f"/v1/subscriptions/{subscription_id}")).status_code == 204
    assert_problem(await stack.client.post(path), 404)
    assert_problem(await stack.client.post(f"/v1/subscriptions/{new_id()}/rotate-secret"), 404)


async def test_a_subscription_without_a_secret_has_none_to_show_or_rotate(stack: DeliveryStack) -> None:
    """A subscription that signs nothing (not a webhook) answers 409 on /secret and on rotate-secret."""
    now = utcnow()
    subscription_id = new_id()
    with stack.sessions.begin() as session:
        session.add(Subscription(id=subscription_id, channel="email", event_types=["order.*"], url=None, secret=None,
                                 description="", enabled=True, options={}, created_at=now, updated_at=now))
    path = f"/v1/subscriptions/{subscription_id}"
    assert "only webhook subscriptions" in assert_problem(await stack.client.get(f"{path}/secret"), 409)["detail"]
    assert_problem(await stack.client.post(f"{path}/rotate-secret"), 409)
