"""Profiles (digest §8): ``PUT /v1/profile``, profile reads, and the built-in avatar store.

Avatars: an UPDATE answers an S3 POST-policy form; the client POSTs it as ``multipart/form-data`` to
the CDN root — the built-in store here at ``POST /`` (or the S3 bucket itself) — and everyone fetches
``/profiles/{id}``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from pydantic import Field
from starlette.datastructures import UploadFile

from mailslot.api.auth import OptionalPrincipalDep, PrincipalDep, ServicesDep
from mailslot.api.errors import ApiError
from mailslot.api.media_common import parse_range, ranged_response
from mailslot.api.types import Base64, WireModel, decode_base64_header
from mailslot.services.container import Services
from mailslot.services.profiles import ProfileService, ProfileUpdate

router = APIRouter(tags=["profiles"])

FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the policy fields around the file
FILE_CHUNK = 256 * 1024


def profile_service(svc: Services) -> ProfileService:
    service: ProfileService | None = getattr(svc, "profiles", None)
    if service is None:
        raise ApiError(404, "not_found", "profiles are not offered by this storage configuration")
    return service


class CreateProfileRequest(WireModel):
    version: str = Field(max_length=64)
    commitment: Base64
    name: Base64 | None = None
    aboutEmoji: Base64 | None = None
    about: Base64 | None = None
    paymentAddress: Base64 | None = None
    phoneNumberSharing: Base64 | None = None
    avatar: bool = False
    sameAvatar: bool = False
    badgeIds: list[str] | None = None


class AvatarUploadForm(WireModel):
    key: str
    credential: str
    acl: str
    algorithm: str
    date: str
    policy: str
    signature: str


@router.put("/v1/profile", responses={200: {"model": AvatarUploadForm, "description": "empty, or the avatar form"},
                                      401: {}, 422: {}})
async def set_profile(body: CreateProfileRequest, principal: PrincipalDep, svc: ServicesDep) -> Response:
    form = await profile_service(svc).set_profile(principal, ProfileUpdate(
        version=body.version, commitment=body.commitment, name=body.name, about=body.about,
        about_emoji=body.aboutEmoji, payment_address=body.paymentAddress,
        phone_number_sharing=body.phoneNumberSharing, avatar=body.avatar, same_avatar=body.sameAvatar,
        badge_ids=body.badgeIds or [],
    ))
    if form is None:
        return Response(status_code=200)
    return Response(AvatarUploadForm(**form).model_dump_json(), status_code=200, media_type="application/json")


def _access(principal: Any, unidentified_access_key: str | None, group_send_token: str | None) -> bytes | None:
    if group_send_token is not None:
        if principal is not None or unidentified_access_key is not None:
            raise ApiError(400, "conflicting_credentials", "a group send token cannot be combined with other auth")
        raise ApiError(401, "unsupported_credential", "group send tokens are not offered by this server")
    if principal is None and unidentified_access_key is not None:
        return decode_base64_header(unidentified_access_key) or b""
    return None


READ_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed identifier"},
    401: {"description": "not authorized (also for unknown accounts when anonymous)"},
    404: {"description": "unknown account (authenticated callers)"}, 429: {},
}


@router.get("/v1/profile/{identifier}", responses=READ_RESPONSES)
async def get_profile(
    identifier: str, principal: OptionalPrincipalDep, svc: ServicesDep,
    unidentified_access_key: Annotated[str | None, Header()] = None,
    group_send_token: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    access_key = _access(principal, unidentified_access_key, group_send_token)
    return await profile_service(svc).base_profile(principal, access_key, identifier)


@router.get("/v1/profile/{identifier}/{version}", responses=READ_RESPONSES)
async def get_versioned_profile(
    identifier: str, version: str, principal: OptionalPrincipalDep, svc: ServicesDep,
    unidentified_access_key: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    access_key = _access(principal, unidentified_access_key, None)
    return await profile_service(svc).versioned_profile(principal, access_key, identifier, version)


async def _file_chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(FILE_CHUNK):
        yield chunk


@router.post("/", status_code=204, responses={400: {}, 403: {"description": "policy or signature refused"},
                                               411: {}, 413: {}})
async def post_avatar(request: Request, svc: ServicesDep,
                      content_length: Annotated[str | None, Header()] = None) -> Response:
    """The built-in store's S3-style browser upload (multipart/form-data, the file last)."""
    service = profile_service(svc)
    if content_length is None or not content_length.isdigit():
        raise ApiError(411, "length_required", "the upload needs a Content-Length")
    if int(content_length) > service.settings.avatar_max_bytes + FORM_OVERHEAD:
        raise ApiError(413, "payload_too_large", "the avatar is too large")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "invalid_form", "the upload must be multipart/form-data")
    async with request.form(max_files=1, max_fields=16) as form:
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "invalid_form", "the form has no file")
        key, low, high = service.check_avatar_post(fields)
        size = upload.size if upload.size is not None else 0
        if not low <= size <= high:
            raise ApiError(400, "entity_too_small" if size < low else "entity_too_large",
                           f"the file must be {low} to {high} bytes")
        await service.store_avatar(key, _file_chunks(upload))
    return Response(status_code=204)


@router.get("/profiles/{name}", responses={206: {}, 404: {}, 416: {}})
async def get_avatar(name: str, svc: ServicesDep, range: Annotated[str | None, Header()] = None) -> Response:
    service = profile_service(svc)
    info = await service.avatar_info(name)
    byte_range = parse_range(range, info.size)
    start, end = byte_range if byte_range is not None else (0, info.size)
    return ranged_response(service.read_avatar(name, start, end), info.size, byte_range,
                           "application/octet-stream", head=False)
