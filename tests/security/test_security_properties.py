"""Property tests (hypothesis) of the code that parses and signs what strangers send us.

The envelope parser never fails with anything but ``EnvelopeError`` and what it accepts survives a
round trip; the topic matcher agrees with an independent model of RabbitMQ's topic rules;
signatures agree with the Standard Webhooks reference library in both directions and change
when anything signed changes.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from consumers.router import decode_message
from consumers.signing import InvalidSecretError, decode_secret, sign
from consumers.topics import topic_matches
from schemas.events import CloudEvent, EnvelopeError, event_from_binary, event_from_json

SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

# Enough examples to find the edges, few enough for CI on 2 cores (the whole file runs in seconds).
settings.register_profile("hookgate", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("hookgate")

_json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
                 | st.floats(allow_nan=False, allow_infinity=False) | st.text())
_json = st.recursive(
    _json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
_word = st.text(st.sampled_from("abcxyz019_-:/"), min_size=1, max_size=6)
_event_type = st.lists(_word, min_size=1, max_size=5).map(".".join)
_envelope_keys = st.sampled_from(["type", "source", "id", "data", "subject", "time", "specversion",
                                  "data_base64", "datacontenttype", "dataschema", "ext1", "Bad Name", ""])
# Objects shaped like events, with every field possibly of the wrong type.
_envelopes = st.dictionaries(_envelope_keys, _json | _event_type, max_size=8)


@given(_json | _envelopes)
def test_the_json_envelope_parser_fails_only_with_envelope_errors(obj: object) -> None:
    """Any JSON value is an event or an EnvelopeError with a detail, never another exception."""
    try:
        event = event_from_json(obj, default_source="urn:test")
    except EnvelopeError as exc:
        assert exc.detail
    else:
        assert isinstance(event, CloudEvent)


@given(st.binary(max_size=512), st.dictionaries(st.text(max_size=20), st.text(max_size=20) | st.binary(max_size=20)
                                                | st.integers(), max_size=6),
       st.none() | st.sampled_from(["application/json", "text/plain", "application/cloudevents+json", "", ";;"]),
       st.none() | st.text(max_size=40))
def test_any_amqp_message_decodes_to_an_event_or_an_envelope_error(body: bytes, headers: dict[str, object],
                                                                    content_type: str | None,
                                                                    message_id: str | None) -> None:
    """The router's decoder, given arbitrary bytes and headers, raises nothing but EnvelopeError."""
    try:
        event = decode_message(body, headers, content_type, message_id, None, max_bytes=256)
    except EnvelopeError as exc:
        assert exc.detail
    else:
        assert isinstance(event, CloudEvent)


@given(st.dictionaries(st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789"), min_size=1, max_size=12),
                       st.text(max_size=30), max_size=6),
       st.binary(max_size=128), st.none() | st.sampled_from(["application/json", "application/octet-stream"]))
def test_binary_mode_attributes_fail_only_with_envelope_errors(attributes: dict[str, str], body: bytes,
                                                                content_type: str | None) -> None:
    """Binary-mode ce-* attributes and any body give an event or an EnvelopeError."""
    try:
        event_from_binary({"specversion": "1.0", **attributes}, body, content_type, default_source="urn:test")
    except EnvelopeError as exc:
        assert exc.detail


@given(_event_type, st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40), _json,
       st.none() | st.datetimes(timezones=st.just(UTC)))
def test_an_accepted_event_round_trips_through_its_structured_json(event_type: str, source: str, event_id: str,
                                                                   data: object, time: datetime | None) -> None:
    """What the gateway publishes (structured JSON) is what the router decodes: the same event."""
    fields: dict[str, object] = {"type": event_type, "source": source, "id": event_id, "data": data}
    if time is not None:
        fields["time"] = time.isoformat()
    event = event_from_json(fields)
    again = decode_message(event.to_json(), {}, "application/cloudevents+json", None, None, max_bytes=1 << 20)
    assert again == event


_pattern_word = st.sampled_from(["a", "b", "c", "*", "#"])
_key_word = st.sampled_from(["a", "b", "c"])


@given(st.lists(_pattern_word, min_size=1, max_size=5).map(".".join),
       st.lists(_key_word, min_size=1, max_size=6).map(".".join))
@example("#", "a")
@example("a.#", "a")
@example("#.a", "a")
@example("a.#.b", "a.b")
@example("*.#", "a")
@example("#.#", "a.b.c")
def test_the_topic_matcher_agrees_with_a_model_of_rabbitmq(pattern: str, key: str) -> None:
    """``*`` is exactly one word and ``#`` zero or more, as RabbitMQ's topic exchange has it."""
    assert topic_matches(pattern, key) == _brute_force_topic(pattern.split("."), key.split("."))


def _brute_force_topic(pattern: list[str], words: list[str]) -> bool:
    """A second, independent model: try every way ``#`` can take words (dynamic programming)."""
    reach = [[False] * (len(words) + 1) for _ in range(len(pattern) + 1)]
    reach[0][0] = True
    for i, part in enumerate(pattern, start=1):
        for j in range(len(words) + 1):
            if part == "#":
                reach[i][j] = any(reach[i - 1][k] for k in range(j + 1))
            elif j > 0:
                reach[i][j] = reach[i - 1][j - 1] and (part == "*" or part == words[j - 1])
    return reach[len(pattern)][len(words)]


@given(_event_type)
def test_a_type_matches_itself_and_hash(event_type: str) -> None:
    """Every routable type matches its own literal pattern and ``#``; ``*`` only when it is one word."""
    assert topic_matches(event_type, event_type)
    assert topic_matches("#", event_type)
    assert topic_matches("*", event_type) == ("." not in event_type)


def test_the_spec_known_answer() -> None:
    """The Standard Webhooks example signs to the spec's signature."""
    assert sign([SPEC_SECRET], SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


_secrets = st.binary(min_size=1, max_size=64).map(lambda key: "whsec_" + base64.b64encode(key).decode())
# The reference library verifies text: bodies it can decode (ASCII, so a flipped low bit stays ASCII).
_bodies = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=64).map(str.encode)
_msg_ids = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="."), min_size=1, max_size=40)


@given(_secrets, _msg_ids, st.text(max_size=256))
def test_our_signatures_verify_with_the_reference_library(secret: str, msg_id: str, text: str) -> None:
    """The reference library verifies every signature we make, for any key, id and body."""
    now = int(datetime.now(UTC).timestamp())
    body = text.encode()
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(now),
               "webhook-signature": sign([secret], msg_id, now, body)}
    Webhook(secret).verify(body, headers, json_parse=False)


@given(_secrets, _msg_ids, st.integers(1_000_000_000, 4_000_000_000), st.text(max_size=128))
def test_reference_signatures_are_ours(secret: str, msg_id: str, timestamp: int, text: str) -> None:
    """Whatever the reference library signs, we sign identically (UTF-8 bodies)."""
    theirs = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, tz=UTC), text)
    assert sign([secret], msg_id, timestamp, text.encode()) == theirs


@given(_secrets, _secrets, _msg_ids, _bodies)
def test_rotation_signs_with_every_secret(old: str, new: str, msg_id: str, body: bytes) -> None:
    """During a rotation a receiver holding either secret verifies the message."""
    now = int(datetime.now(UTC).timestamp())
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(now), "webhook-signature": sign([old, new], msg_id,
                                                                                              now, body)}
    for secret in (old, new):
        Webhook(secret).verify(body, headers, json_parse=False)


@given(_secrets, _msg_ids, _bodies.filter(bool), st.data())
def test_any_change_to_what_is_signed_breaks_the_signature(secret: str, msg_id: str, body: bytes,
                                                           data: st.DataObject) -> None:
    """Flipping any byte of the body, or changing the id or timestamp, fails verification."""
    now = int(datetime.now(UTC).timestamp())
    signature = sign([secret], msg_id, now, body)
    position = data.draw(st.integers(0, len(body) - 1))
    tampered = body[:position] + bytes([body[position] ^ 0x01]) + body[position + 1:]
    for headers, payload in (
        ({"webhook-id": msg_id, "webhook-timestamp": str(now), "webhook-signature": signature}, tampered),
        ({"webhook-id": msg_id + "x", "webhook-timestamp": str(now), "webhook-signature": signature}, body),
        ({"webhook-id": msg_id, "webhook-timestamp": str(now - 1), "webhook-signature": signature}, body),
    ):
        try:
            Webhook(secret).verify(payload, headers, json_parse=False)
        except WebhookVerificationError:
            continue
        raise AssertionError(f"a tampered message verified: {headers}")


@given(st.text(max_size=60))
def test_a_bad_secret_is_refused_with_invalid_secret_error(text: str) -> None:
    """Any string is a usable secret (non-empty base64 after whsec_) or an InvalidSecretError, nothing else."""
    try:
        key = decode_secret("whsec_" + text)
    except InvalidSecretError:
        return
    assert key
