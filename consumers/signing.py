"""Standard Webhooks signatures: ``v1,`` + base64 HMAC-SHA256 over ``{id}.{timestamp}.{body}``."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from functools import lru_cache

__all__ = ["SECRET_PREFIX", "InvalidSecretError", "decode_secret", "sign"]

SECRET_PREFIX = "whsec_"


class InvalidSecretError(ValueError):
    """The signing secret is not ``whsec_`` + base64 of a non-empty key; signing cannot proceed."""


@lru_cache(maxsize=1024)
def decode_secret(secret: str) -> bytes:
    """The HMAC key of a ``whsec_…`` secret: its base64 part, decoded (missing padding tolerated)."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except ValueError as exc:  # binascii.Error, or a non-ASCII character
        raise InvalidSecretError("the signing secret is not valid base64 after 'whsec_'") from exc
    if not key:
        raise InvalidSecretError("the signing secret is empty")
    return key


def sign(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: one ``v1,<sig>`` per secret, space-separated.

    Several secrets sign the same message during a key rotation, so receivers holding either
    the old or the new secret verify it.
    """
    if not secrets:
        raise InvalidSecretError("at least one signing secret is needed")
    message = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    return " ".join(
        "v1," + base64.b64encode(hmac.digest(decode_secret(secret), message, hashlib.sha256)).decode()
        for secret in secrets
    )
