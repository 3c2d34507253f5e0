"""Every error is JSON: ``{"code","message"}`` unless the digest defines another body. Never a trace."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mailslot.services.errors import ServiceError
from mailslot.services.ratelimit import RateLimitExceeded

log = logging.getLogger("mailslot.api")

_STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 411: "length_required", 413: "payload_too_large", 415: "unsupported_media_type",
    422: "invalid_request", 429: "rate_limited",
}


class ApiError(ServiceError):
    """An error raised by the API layer itself (same shape as a service refusal)."""


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"code": code, "message": message, **extra}


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", "missing or invalid credentials",
                    headers={"WWW-Authenticate": 'Basic realm="Mailslot"'})


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


ErrorParts = tuple[int, dict[str, str], Any]


def service_error_parts(exc: ServiceError) -> ErrorParts:
    body = exc.body if exc.body is not None else error_body(exc.code, exc.message)
    return exc.status, exc.headers, body


def rate_limited_parts(exc: RateLimitExceeded) -> ErrorParts:
    headers = {}
    if exc.retry_after_seconds is not None:
        headers["Retry-After"] = str(exc.retry_after_seconds)
    return 429, headers, error_body("rate_limited", "too many requests; try again later")


def validation_error_parts(errors_in: Sequence[Any], prefix: tuple[Any, ...] = ()) -> ErrorParts:
    errors = []
    for err in errors_in:
        message = str(err.get("msg", "invalid value"))
        field = _field_name(prefix + tuple(err.get("loc", ())))
        if err.get("type") == "json_invalid":
            # The location of a JSON syntax error is a character offset, not a field.
            message, field = "body is not valid JSON", "body"
        errors.append({"field": field, "message": message})
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    return 422, {}, error_body("invalid_request", f"{first['field']}: {first['message']}", errors=errors)


def _json(parts: ErrorParts) -> JSONResponse:
    status, headers, body = parts
    return JSONResponse(body, status_code=status, headers=headers)


async def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return _json(service_error_parts(exc))


async def _rate_limited(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RateLimitExceeded)
    return _json(rate_limited_parts(exc))


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _json(validation_error_parts(exc.errors()))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=exc.headers)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", extra={"error_type": type(exc).__name__})
    return JSONResponse(error_body("internal_error", "the server could not handle the request"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RateLimitExceeded, _rate_limited)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
