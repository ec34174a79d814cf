"""Service exceptions, and the one JSON error body every non-2xx answer has: ``{"error": "..."}``.

``service.frontend.app`` maps exceptions (and everything else) to it; the ASGI guard in
``service.frontend.middleware`` renders its refusals with the same :func:`json_error`.
"""

from __future__ import annotations

from starlette.responses import JSONResponse


def json_error(status: int, message: str, headers: dict[str, str] | None = None, request_id: str | None = None) -> JSONResponse:
    body = {"error": message} if request_id is None else {"error": message, "request_id": request_id}
    return JSONResponse(body, status_code=status, headers=headers)


class ServiceError(Exception):
    """An error with an HTTP status; the message is safe to show to the client."""

    status = 500
    reason = "internal"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServiceError):
    status, reason = 400, "bad_request"


class Unauthorized(ServiceError):
    status, reason = 401, "unauthorized"

    def __init__(self, message: str = "missing or invalid API key (use 'Authorization: Bearer <key>')") -> None:
        super().__init__(message, {"WWW-Authenticate": "Bearer"})


class NotFound(ServiceError):
    status, reason = 404, "not_found"


class PayloadTooLarge(ServiceError):
    status, reason = 413, "body_too_large"


class UnsupportedMediaType(ServiceError):
    status, reason = 415, "unsupported_media_type"


class ClientClosed(ServiceError):
    """499 (nginx's convention): the client left before the answer; nothing reaches it, the metrics count it."""

    status, reason = 499, "client_closed"


class Unavailable(ServiceError):
    """503: the model is not ready, the queue is full, the request timed out, or the server is draining."""

    status = 503

    def __init__(self, message: str, reason: str = "unavailable", retry_after: float | None = None) -> None:
        super().__init__(message, {"Retry-After": str(max(1, round(retry_after)))} if retry_after else None)
        self.reason = reason
