"""Standard Webhooks signing agrees with the spec's known answer and with the reference library."""

from __future__ import annotations

import base64
import os
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from consumers.signing import InvalidSecretError, decode_secret, sign

SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def _secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def _headers(secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secrets, msg_id, timestamp, body)}


def test_known_answer_from_the_spec() -> None:
    """The spec's example secret, id, timestamp and body give the spec's signature."""
    assert sign([SPEC_SECRET], SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


def test_matches_the_reference_library() -> None:
    """For random secrets and bodies, the reference library's signature is ours."""
    for _ in range(20):
        secret, body = _secret(), os.urandom(16).hex().encode()
        expected = Webhook(secret).sign("msg_1", datetime.fromtimestamp(SPEC_TIMESTAMP, UTC), body.decode())
        assert sign([secret], "msg_1", SPEC_TIMESTAMP, body) == expected


def test_reference_library_verifies_our_headers() -> None:
    """Headers we produce pass the reference library's verify with the current time."""
    secret, body, now = _secret(), b'{"type":"order.created","data":{"n":1}}', int(time.time())
    verified = Webhook(secret).verify(body, _headers([secret], "d-1", now, body))
    assert verified == {"type": "order.created", "data": {"n": 1}}


def test_tampered_body_fails_verification() -> None:
    """A body changed after signing is rejected by the reference library."""
    secret, now = _secret(), int(time.time())
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(b'{"x":1}', _headers([secret], "d-1", now, b"{}"))


def test_rotation_signs_with_every_secret() -> None:
    """Two secrets give two space-separated signatures, each verifiable by a holder of either secret."""
    old, new, now = _secret(), _secret(), int(time.time())
    headers = _headers([old, new], "d-2", now, b"{}")
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(b"{}", headers)


def test_secret_without_padding_decodes_like_the_library() -> None:
    """A secret whose base64 lost its padding gives the same key the reference library uses."""
    raw = os.urandom(20)
    unpadded = "whsec_" + base64.b64encode(raw).decode().rstrip("=")
    assert decode_secret(unpadded) == raw


@pytest.mark.parametrize("bad", ["whsec_", "whsec_not base64!", "whsec_a"])
def test_invalid_secrets_are_refused(bad: str) -> None:
    """An empty or non-base64 secret raises InvalidSecretError instead of signing with garbage."""
    with pytest.raises(InvalidSecretError):
        sign([bad], "d-3", SPEC_TIMESTAMP, b"{}")


def test_no_secret_is_refused() -> None:
    """Signing with no secret at all raises InvalidSecretError."""
    with pytest.raises(InvalidSecretError):
        sign([], "d-4", SPEC_TIMESTAMP, b"{}")
