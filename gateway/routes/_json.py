"""JSON in and out of the management routes: bad bodies become 400, 415 and 422 problems."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from pydantic.main import IncEx
from starlette.requests import Request
from starlette.responses import Response

from gateway.problems import Problem

__all__ = ["field_errors", "model_response", "read_model", "validated"]

M = TypeVar("M", bound=BaseModel)


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Pydantic's errors as ``[{"field", "message"}]``, the shape of every 422's ``errors``."""
    return [
        {"field": ".".join(str(part) for part in err["loc"]) or "(body)", "message": err["msg"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]


def validated(model: type[M], obj: Any) -> M:
    """``obj`` as ``model``, or a 422 problem listing every field error."""
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        errors = field_errors(exc)
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise Problem(422, f"the request is invalid: {detail}", errors=errors) from exc


async def read_model(request: Request, model: type[M]) -> M:
    """The request's JSON body as ``model``: 415 unless JSON, 400 if malformed, 422 if invalid."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        shown = media_type or "none"
        raise Problem(415, f"send the body as application/json (got {shown})")
    try:
        obj = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise Problem(400, f"the body is not valid JSON: {exc}") from exc
    return validated(model, obj)


def model_response(model: BaseModel, status: int = 200, *, exclude: IncEx | None = None) -> Response:
    return Response(model.model_dump_json(exclude=exclude), status_code=status, media_type="application/json")
