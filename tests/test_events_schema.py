"""The envelope parser: plain JSON, structured and binary CloudEvents."""

from __future__ import annotations

import pytest

from schemas.events import CloudEvent, EnvelopeError, event_from_binary, event_from_json


def test_plain_event_gets_an_id_and_keeps_its_fields() -> None:
    """A plain event without id is given one; type, source and data are kept."""
    event = event_from_json({"type": "order.paid", "source": "shop", "data": {"n": 1}})
    assert event.id and event.type == "order.paid" and event.source == "shop" and event.data == {"n": 1}


def test_idempotency_key_overrides_the_body_id() -> None:
    """A forced id (Idempotency-Key) wins over the id in the body."""
    event = event_from_json({"type": "a", "source": "s", "id": "body"}, forced_id="key")
    assert event.id == "key"


def test_default_source_fills_only_a_missing_source() -> None:
    """The key-derived source is used only when the event has none."""
    assert event_from_json({"type": "a"}, default_source="key:1").source == "key:1"
    assert event_from_json({"type": "a", "source": "mine"}, default_source="key:1").source == "mine"


def test_structured_extensions_round_trip() -> None:
    """Unknown attributes of a structured event are extensions and survive a round trip."""
    raw = {"specversion": "1.0", "id": "1", "source": "s", "type": "a.b", "data": None, "traceparent": "x"}
    event = event_from_json(raw)
    assert event.extensions == {"traceparent": "x"}
    assert event.structured() == raw
    assert CloudEvent.model_validate(event.model_dump()) == event


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ([1, 2], "JSON object"),
        ({"source": "s"}, "type"),
        ({"type": "a b", "source": "s"}, "type"),
        ({"type": "order.#", "source": "s"}, "type"),
        ({"type": "a", "source": "s", "color": "red"}, "unknown field"),
        ({"specversion": "0.3", "type": "a", "source": "s", "id": "1"}, "specversion"),
        ({"specversion": "1.0", "type": "a", "source": "s", "id": "1", "Bad-Name": 1}, "extension"),
        ({"type": "a", "source": "s", "time": "yesterday"}, "time"),
    ],
)
def test_invalid_envelopes_are_refused_with_a_reason(body: object, fragment: str) -> None:
    """Each invalid envelope raises EnvelopeError whose detail names the problem."""
    with pytest.raises(EnvelopeError) as info:
        event_from_json(body)
    assert fragment in info.value.detail


def test_binary_mode_json_body_becomes_data() -> None:
    """Binary mode takes attributes from headers and parses a JSON body as data."""
    event = event_from_binary({"specversion": "1.0", "id": "9", "source": "s", "type": "a", "traceid": "t"},
                              b'{"x": 1}', "application/json")
    assert event.data == {"x": 1} and event.extensions == {"traceid": "t"} and event.id == "9"


def test_binary_mode_other_media_is_base64() -> None:
    """A non-JSON binary body is carried as data_base64."""
    event = event_from_binary({"specversion": "1.0", "id": "9", "source": "s", "type": "a"}, b"\x00\x01",
                              "application/octet-stream")
    assert event.data_base64 == "AAE=" and event.data is None
