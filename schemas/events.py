"""The event envelope (CloudEvents 1.0) and its decoding from JSON, HTTP headers and AMQP."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.ids import new_id

__all__ = ["MAX_BATCH_EVENTS", "CloudEvent", "EnvelopeError", "event_from_binary", "event_from_json"]

# Events in one batch, a POST /v1/events/batch or a batch message: what one store transaction takes at a time.
MAX_BATCH_EVENTS = 1000

# Event types are routing keys: dot-separated words, no topic wildcards, at most 255 bytes (AMQP).
_TYPE_RE = re.compile(r"^[A-Za-z0-9_\-:/]+(\.[A-Za-z0-9_\-:/]+)*$")
_EXTENSION_NAME_RE = re.compile(r"^[a-z0-9]{1,20}$")
_CORE_ATTRIBUTES = frozenset(
    {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "dataschema"}
)
_STRUCTURED_KEYS = _CORE_ATTRIBUTES | {"data", "data_base64"}
_PLAIN_KEYS = frozenset({"type", "source", "data", "id", "subject", "time"})
ExtensionValue = str | int | bool


class EnvelopeError(ValueError):
    """The input is not a valid event; ``detail`` says why for the problem body or dead-letter header."""

    def __init__(self, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class CloudEvent(BaseModel):
    """A CloudEvents 1.0 event; identity is (source, id), the routing key is ``type``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    specversion: str = "1.0"
    id: str = Field(min_length=1, max_length=256)
    source: str = Field(min_length=1, max_length=1024)
    type: str = Field(min_length=1, max_length=255)
    subject: str | None = Field(default=None, max_length=1024)
    time: datetime | None = None
    datacontenttype: str | None = None
    dataschema: str | None = None
    data: Any = None
    data_base64: str | None = None
    extensions: dict[str, ExtensionValue] = Field(default_factory=dict)

    @field_validator("specversion")
    @classmethod
    def _only_1_0(cls, value: str) -> str:
        if value != "1.0":
            raise ValueError("only CloudEvents specversion 1.0 is supported")
        return value

    @field_validator("type")
    @classmethod
    def _routable_type(cls, value: str) -> str:
        if not _TYPE_RE.match(value) or len(value.encode()) > 255:
            raise ValueError("type must be dot-separated words without spaces or wildcards, ≤ 255 bytes")
        return value

    @field_validator("extensions")
    @classmethod
    def _extension_names(cls, value: dict[str, ExtensionValue]) -> dict[str, ExtensionValue]:
        for name in value:
            if not _EXTENSION_NAME_RE.match(name) or name in _STRUCTURED_KEYS:
                raise ValueError(f"invalid extension attribute name {name!r}")
        return value

    def structured(self) -> dict[str, Any]:
        """The CloudEvents structured-mode JSON object (extensions at the top level)."""
        out: dict[str, Any] = {"specversion": self.specversion, "id": self.id, "source": self.source,
                               "type": self.type}
        for key in ("subject", "datacontenttype", "dataschema"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.time is not None:
            out["time"] = self.time.isoformat()
        if self.data_base64 is not None:
            out["data_base64"] = self.data_base64
        else:
            out["data"] = self.data
        out.update(self.extensions)
        return out

    def to_json(self) -> bytes:
        return orjson.dumps(self.structured())


def _validate(fields: dict[str, Any]) -> CloudEvent:
    try:
        return CloudEvent.model_validate(fields)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in err["loc"]) or "(envelope)", "message": err["msg"]}
            for err in exc.errors(include_url=False, include_input=False)
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise EnvelopeError(f"invalid event: {detail}", errors) from exc


def event_from_json(obj: Any, *, default_source: str | None = None, default_id: str | None = None,
                    forced_id: str | None = None) -> CloudEvent:
    """Decode plain JSON ``{type, source, data, id?, subject?, time?}`` or a structured CloudEvent.

    An object with ``specversion`` is structured mode, whose unknown attributes are extensions;
    otherwise only the plain keys are allowed. ``forced_id`` (an ``Idempotency-Key``) wins over
    the body's id, ``default_id`` (an AMQP ``message_id``) only fills a missing one.
    """
    if not isinstance(obj, dict):
        raise EnvelopeError(f"an event must be a JSON object, not {type(obj).__name__}")
    if "specversion" in obj:
        fields = {k: v for k, v in obj.items() if k in _STRUCTURED_KEYS}
        fields["extensions"] = {k: v for k, v in obj.items() if k not in _STRUCTURED_KEYS}
        if "data" in fields and "data_base64" in fields:
            raise EnvelopeError("invalid event: data and data_base64 are mutually exclusive")
    else:
        unknown = sorted(set(obj) - _PLAIN_KEYS)
        if unknown:
            raise EnvelopeError(
                f"invalid event: unknown field(s) {', '.join(unknown)}; plain events take "
                "type, source, data, id, subject and time (send specversion for CloudEvents extensions)"
            )
        fields = dict(obj)
    return _validate(_fill_identity(fields, default_source, default_id, forced_id))


def _fill_identity(fields: dict[str, Any], default_source: str | None, default_id: str | None,
                   forced_id: str | None) -> dict[str, Any]:
    if forced_id is not None:
        fields["id"] = forced_id
    elif fields.get("id") is None:
        fields["id"] = default_id or new_id()
    if fields.get("source") is None and default_source is not None:
        fields["source"] = default_source
    return fields


def event_from_binary(attributes: Mapping[str, str], body: bytes, content_type: str | None, *,
                      default_source: str | None = None, forced_id: str | None = None) -> CloudEvent:
    """Decode binary mode: attributes from ``ce-*`` headers (or AMQP properties), the body is data."""
    if attributes.get("specversion") is None:
        raise EnvelopeError("binary-mode events need the specversion attribute (ce-specversion)")
    fields: dict[str, Any] = {k: v for k, v in attributes.items() if k in _CORE_ATTRIBUTES}
    fields["extensions"] = {k: v for k, v in attributes.items() if k not in _CORE_ATTRIBUTES}
    fields["datacontenttype"] = content_type
    if body:
        if content_type is None or is_json_media_type(content_type):
            try:
                fields["data"] = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise EnvelopeError(f"the body is not valid JSON: {exc}") from exc
        else:
            fields["data_base64"] = base64.b64encode(body).decode()
    return _validate(_fill_identity(fields, default_source, None, forced_id))


def is_json_media_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")
