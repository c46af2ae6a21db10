"""Phone numbers as Callflow stores and dials them: E.164, valid for their country."""

from __future__ import annotations

import phonenumbers

E164_EXAMPLE = "+14155550123"
# E.164 allows at most 15 digits, and Callflow stores a number in 16 characters. The numbering plans phonenumbers
# knows also call some longer numbers valid (German and Nigerian ones of 16 and 17 digits): no such number is E.164.
E164_MAX_DIGITS = 15


def e164(value: str) -> str:
    """The number itself when it is a valid E.164 number; ValueError (with the reason) otherwise."""
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"must be an E.164 phone number such as {E164_EXAMPLE}") from exc
    formatted = _formatted(number)
    if formatted != value:
        raise ValueError(f"must be a valid E.164 phone number such as {E164_EXAMPLE}")
    return formatted


def normalised_e164(value: str) -> str:
    """A number written with spaces, dashes or brackets (`+1 (415) 555-0123`) in E.164; ValueError when it is not a
    valid international number."""
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"must be an international phone number such as {E164_EXAMPLE}") from exc
    return _formatted(number)


def _formatted(number: phonenumbers.PhoneNumber) -> str:
    """The number in E.164; ValueError when it is not valid, or longer than E.164 allows."""
    formatted = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if not phonenumbers.is_valid_number(number):
        raise ValueError(f"must be a valid phone number such as {E164_EXAMPLE}")
    if len(formatted) - 1 > E164_MAX_DIGITS:
        raise ValueError(f"must have at most {E164_MAX_DIGITS} digits, as E.164 allows")
    return formatted
