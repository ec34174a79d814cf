"""Pydantic bodies shared by both protocols: the error body and the error responses routes document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from service.errors import BadRequest


class ErrorBody(BaseModel):
    """Every non-2xx answer. ``request_id`` is set on 500s, and names the server log line."""

    error: str
    request_id: str | None = None


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses, all with :class:`ErrorBody`."""
    words = {400: "invalid input, or outside the model's support", 401: "missing or invalid API key", 404: "unknown model or version",
             413: "body too large", 415: "unsupported Content-Type", 422: "invalid parameters",
             500: "internal error (with a request id)", 503: "not ready, queue full, timed out or draining (with Retry-After)"}
    return {c: {"model": ErrorBody, "description": words[c]} for c in codes}


INFERENCE_ERRORS = error_responses(400, 401, 404, 413, 415, 500, 503)
METADATA_ERRORS = error_responses(404, 500)


class Strict(BaseModel):
    """Request bodies refuse unknown fields."""

    model_config = ConfigDict(extra="forbid")


def parse(model: type[BaseModel], data: object, where: str = "body") -> BaseModel:
    """Validate ``data`` as ``model``; a failure is a 400 naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(map(str, err["loc"])) or where
        raise BadRequest(f"{loc}: {err['msg']}") from None


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """``node`` with every ``{"$ref": "#/$defs/X"}`` replaced by ``X``'s schema (the bodies are not recursive)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def json_body(model: type[BaseModel], *others: str, required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` documenting ``model`` as the JSON request body, and ``others`` as raw binary alternatives.

    The routes read their bodies themselves (JSON or uploads on one path) and parse them with
    :func:`parse`; this puts the same model into ``/openapi.json``.
    """
    schema = model.model_json_schema()
    content: dict[str, Any] = {"application/json": {"schema": _inline(schema, schema.get("$defs", {}))}}
    for media in others:
        content[media] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": required, "content": content}}
