"""Helpers of the media routers: the media services (absent when not configured), Range parsing."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from mailslot.api.errors import ApiError
from mailslot.services.attachments import AttachmentService
from mailslot.services.container import Services

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def attachment_service(svc: Services) -> AttachmentService:
    service: AttachmentService | None = getattr(svc, "attachments", None)
    if service is None:
        raise ApiError(404, "not_found", "attachments are not offered by this server")
    return service


def base_url(request: Request, configured: str) -> str:
    if configured:
        return configured.rstrip("/")
    public: str = request.app.state.settings.server.public_url
    return (public or str(request.base_url)).rstrip("/")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``Range: bytes=a-b`` → (start, end exclusive); None: serve the whole object.

    Several ranges or a malformed header are ignored (RFC 9110 allows that); a range that starts past
    the end is 416.
    """
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:  # suffix: the last N bytes
        count = int(last)
        if count == 0:
            raise _unsatisfiable(size)
        return max(0, size - count), size
    start = int(first)
    end = size if not last else min(size, int(last) + 1)
    if start >= size or (last and int(last) < start):
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> ApiError:
    return ApiError(416, "range_not_satisfiable", "the requested range is outside the object",
                    headers={"Content-Range": f"bytes */{size}"})


def ranged_response(
    chunks: AsyncIterator[bytes], size: int, byte_range: tuple[int, int] | None, content_type: str, head: bool
) -> Response:
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "private, max-age=86400"}
    status = 200
    length = size
    if byte_range is not None:
        start, end = byte_range
        status, length = 206, end - start
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(length)
    if head:
        return Response(status_code=status, headers=headers, media_type=content_type)
    return StreamingResponse(chunks, status_code=status, headers=headers, media_type=content_type)
