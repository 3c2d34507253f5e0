"""E.164 validation and normalisation (``phonenumbers``)."""

from __future__ import annotations

import re

import phonenumbers

from mailslot.services.errors import ServiceError

E164_SHAPE = re.compile(r"^\+[1-9][0-9]{6,14}$")


def normalize_number(number: str, test_numbers: dict[str, str] | None = None) -> str:
    """Return the E.164 form of ``number`` or raise.

    422 when it is no phone number at all; 400 with ``originalNumber``/``normalizedNumber`` when it is
    valid but not written in its normalised form (the client should retry with the normalised one).
    Test numbers need only be E.164-shaped.
    """
    if test_numbers and number in test_numbers and E164_SHAPE.match(number):
        return number
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException as exc:
        raise ServiceError(422, "invalid_number", "number is not a valid E.164 phone number") from exc
    if not phonenumbers.is_valid_number(parsed):
        raise ServiceError(422, "invalid_number", "number is not a valid E.164 phone number")
    normalized = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    if normalized != number:
        raise ServiceError(
            400,
            "number_not_normalized",
            "number is not in normalised E.164 form",
            body={"originalNumber": number, "normalizedNumber": normalized},
        )
    return normalized
