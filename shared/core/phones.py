"""Phone numbers as Callflow stores and dials them: E.164, valid for their country."""

from __future__ import annotations

import phonenumbers

E164_EXAMPLE = "+14155550123"


def e164(value: str) -> str:
    """The number itself when it is a valid E.164 number; ValueError (with the reason) otherwise."""
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"must be an E.164 phone number such as {E164_EXAMPLE}") from exc
    formatted = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if formatted != value or not phonenumbers.is_valid_number(number):
        raise ValueError(f"must be a valid E.164 phone number such as {E164_EXAMPLE}")
    return formatted


def normalised_e164(value: str) -> str:
    """A number written with spaces, dashes or brackets (`+1 (415) 555-0123`) in E.164; ValueError when it is not a
    valid international number."""
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"must be an international phone number such as {E164_EXAMPLE}") from exc
    if not phonenumbers.is_valid_number(number):
        raise ValueError(f"must be a valid phone number such as {E164_EXAMPLE}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
