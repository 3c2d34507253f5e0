"""Domain errors that the API layer maps to HTTP answers."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A refusal with an HTTP status, a machine-readable code and optionally the digest's body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.body = body
        self.headers = headers or {}


def not_found(what: str) -> ServiceError:
    return ServiceError(404, "not_found", f"{what} not found")


def invalid(message: str, field: str | None = None) -> ServiceError:
    body: dict[str, Any] = {"code": "invalid_request", "message": message}
    if field:
        body["errors"] = [{"field": field, "message": message}]
    return ServiceError(422, "invalid_request", message, body=body)
