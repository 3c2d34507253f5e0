"""Attachments (digest §9): the upload form, the built-in tus 1.0 endpoint and ranged downloads.

tus: ``POST /attachments`` creates (``Upload-Length``, ``Upload-Metadata: filename <b64 key>``),
``HEAD /attachments/{key}`` tells the offset to resume from, ``PATCH`` appends at ``Upload-Offset``
(``application/offset+octet-stream``, 409 on a wrong offset), ``DELETE`` terminates, ``OPTIONS``
advertises the extensions. Every tus request carries the form's upload token as ``Bearer``.
Bodies are read with ``request.stream()`` and go to the blob store chunk by chunk.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import MutableMapping
from email.utils import formatdate
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.requests import ClientDisconnect

from mailslot.api.auth import PrincipalDep, ServicesDep
from mailslot.api.errors import ApiError
from mailslot.api.media_common import attachment_service, base_url, parse_range, ranged_response
from mailslot.services.attachments import TUS_EXTENSIONS, TUS_VERSION, UploadStatus

router = APIRouter(tags=["attachments"])


@router.get("/v4/attachments/form/upload",
            responses={400: {}, 401: {}, 413: {"description": "uploadLength above the maximum"}, 429: {}})
async def upload_form(request: Request, principal: PrincipalDep, svc: ServicesDep,
                      uploadLength: Annotated[int | None, Query()] = None) -> dict[str, object]:
    service = attachment_service(svc)
    return await service.upload_form(principal, uploadLength, base_url(request, service.settings.upload_url))


def _tus_headers(status: UploadStatus | None = None) -> dict[str, str]:
    headers = {"Tus-Resumable": TUS_VERSION, "Cache-Control": "no-store"}
    if status is not None:
        headers["Upload-Offset"] = str(status.offset)
        headers["Upload-Length"] = str(status.length)
        if status.expires is not None:
            headers["Upload-Expires"] = formatdate(status.expires, usegmt=True)
    return headers


def _check_version(tus_resumable: str | None) -> None:
    if tus_resumable is not None and tus_resumable != TUS_VERSION:
        raise ApiError(412, "tus_version", "only tus 1.0.0 is supported", headers={"Tus-Version": TUS_VERSION})


def _metadata_key(metadata: str | None) -> str | None:
    if not metadata:
        return None
    for pair in metadata.split(","):
        name, _, value = pair.strip().partition(" ")
        if name == "filename":
            try:
                return base64.b64decode(value.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
                raise ApiError(400, "invalid_metadata", "Upload-Metadata filename is not base64") from exc
    return None


def _int_header(value: str | None, name: str) -> int:
    if value is None or not value.isdigit():
        raise ApiError(400, "invalid_header", f"{name} must be a non-negative integer")
    return int(value)


@router.options("/attachments", status_code=204)
@router.options("/attachments/{key}", status_code=204)
async def tus_options(svc: ServicesDep) -> Response:
    service = attachment_service(svc)
    return Response(status_code=204, headers={
        "Tus-Resumable": TUS_VERSION, "Tus-Version": TUS_VERSION, "Tus-Extension": TUS_EXTENSIONS,
        "Tus-Max-Size": str(service.settings.max_attachment_bytes),
    })


@router.post("/attachments", status_code=201,
             responses={400: {}, 401: {}, 403: {}, 409: {}, 412: {}, 413: {}})
async def tus_create(
    request: Request,
    svc: ServicesDep,
    authorization: Annotated[str | None, Header()] = None,
    upload_length: Annotated[str | None, Header()] = None,
    upload_metadata: Annotated[str | None, Header()] = None,
    tus_resumable: Annotated[str | None, Header()] = None,
) -> Response:
    service = attachment_service(svc)
    _check_version(tus_resumable)
    grant = service.authorize(authorization)
    status = await service.create(grant, _int_header(upload_length, "Upload-Length"), _metadata_key(upload_metadata))
    headers = _tus_headers(status)
    headers["Location"] = base_url(request, service.settings.upload_url) + f"/attachments/{grant.key}"
    return Response(status_code=201, headers=headers)


@router.head("/attachments/{key}", responses={401: {}, 404: {}})
async def tus_head(
    key: str, svc: ServicesDep,
    authorization: Annotated[str | None, Header()] = None,
    tus_resumable: Annotated[str | None, Header()] = None,
) -> Response:
    service = attachment_service(svc)
    _check_version(tus_resumable)
    if authorization is None:
        # Without an upload token HEAD is the download's HEAD (size and range support of the object).
        info = await service.stat(key)
        return ranged_response(service.read(key, 0, 0), info.size, None, "application/octet-stream", head=True)
    service.authorize(authorization, key)
    return Response(status_code=200, headers=_tus_headers(await service.status(key)))


@router.patch("/attachments/{key}", status_code=204,
              responses={400: {}, 401: {}, 404: {}, 409: {}, 412: {}, 413: {}, 415: {}})
async def tus_patch(
    key: str,
    request: Request,
    svc: ServicesDep,
    authorization: Annotated[str | None, Header()] = None,
    upload_offset: Annotated[str | None, Header()] = None,
    content_type: Annotated[str | None, Header()] = None,
    content_length: Annotated[str | None, Header()] = None,
    tus_resumable: Annotated[str | None, Header()] = None,
) -> Response:
    service = attachment_service(svc)
    _check_version(tus_resumable)
    service.authorize(authorization, key)
    if (content_type or "").split(";")[0].strip().lower() != "application/offset+octet-stream":
        raise ApiError(415, "unsupported_media_type", "PATCH bodies must be application/offset+octet-stream")
    offset = _int_header(upload_offset, "Upload-Offset")
    declared = int(content_length) if content_length and content_length.isdigit() else None
    try:
        status = await service.append(key, offset, request.stream(), declared)
    except ClientDisconnect:
        # What arrived is kept; the client asks HEAD for the offset and resumes. Nobody reads this answer.
        return Response(status_code=400)
    return Response(status_code=204, headers=_tus_headers(status))


@router.delete("/attachments/{key}", status_code=204, responses={401: {}, 404: {}})
async def tus_terminate(
    key: str, svc: ServicesDep,
    authorization: Annotated[str | None, Header()] = None,
    tus_resumable: Annotated[str | None, Header()] = None,
) -> Response:
    service = attachment_service(svc)
    _check_version(tus_resumable)
    service.authorize(authorization, key)
    await service.terminate(key)
    return Response(status_code=204, headers={"Tus-Resumable": TUS_VERSION})


@router.get("/attachments/{key}", responses={206: {"description": "partial content"}, 404: {}, 416: {}})
async def download(key: str, svc: ServicesDep, range: Annotated[str | None, Header()] = None) -> Response:
    service = attachment_service(svc)
    info = await service.stat(key)
    byte_range = parse_range(range, info.size)
    start, end = byte_range if byte_range is not None else (0, info.size)
    return ranged_response(service.read(key, start, end), info.size, byte_range, "application/octet-stream",
                           head=False)


def streams_body(scope: MutableMapping[str, Any]) -> bool:
    """Requests whose bodies these routers stream and bound themselves (exempt from ``max_body_bytes``):
    tus appends under ``/attachments/`` and avatar forms posted to ``/``."""
    path = str(scope.get("path", ""))
    method = scope.get("method")
    return (method == "PATCH" and path.startswith("/attachments/")) or (method == "POST" and path == "/")
