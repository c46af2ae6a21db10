"""Request bodies: JSON as PostgreSQL can store it, within size and depth limits; validation errors answered
with every field that failed.

A client's body that PostgreSQL cannot store is refused (400). An authenticated provider's body is read leniently
and made storable where it is stored instead: refusing it would make the provider retry the same body until it
gives up, and a `completed` (and its charge) would be lost.
"""

from __future__ import annotations

import json
import math
from typing import Any

from flask import request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from shared.core.errors import CallflowError, ErrorType
from shared.core.storable import MAX_JSON_DEPTH


def json_body() -> Any:
    """The request's JSON body, as PostgreSQL can store it; anything else is a validation error."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return None
    try:
        body = request.get_json(force=True)
    except (HTTPException, RecursionError) as exc:
        raise CallflowError(ErrorType.VALIDATION_ERROR, "The body is not valid JSON.") from exc
    if _depth(body) > MAX_JSON_DEPTH:
        raise CallflowError(ErrorType.VALIDATION_ERROR, f"The body is nested deeper than {MAX_JSON_DEPTH} levels.")
    return _checked_storable(body)


def provider_json_body() -> Any:
    """An authenticated provider's JSON body, read leniently rather than refused: NaN, Infinity and numbers too
    large to hold become null, bytes that are not UTF-8 U+FFFD. Only a body that is not JSON at all is a validation
    error. The rest of making it storable (lone surrogates, U+0000, depth) is `provider_events.ingest`'s, which
    does it for every execution object it stores, whether it came as a webhook or from Bolna's API."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return None
    try:
        body = json.loads(
            raw.decode("utf-8-sig", errors="replace"),
            parse_constant=lambda _: None,
            parse_float=_finite_or_none,
            parse_int=_int_or_none,
        )
    except (ValueError, RecursionError) as exc:
        # An event, not a breadcrumb: Bolna sends the same body again until it gives up, and the status it held
        # (a `completed`, and its charge) would be lost unseen.
        raise CallflowError(ErrorType.INVALID_WEBHOOK_PAYLOAD, "The body is not valid JSON.") from exc
    return body


def _finite_or_none(text: str) -> float | None:
    number = float(text)
    return number if math.isfinite(number) else None


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        return None


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth <= MAX_JSON_DEPTH:
            children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _checked_storable(value: Any) -> Any:
    """The body as PostgreSQL's jsonb can hold it. U+0000 is dropped rather than the request refused (it is
    harmless noise); NaN, Infinity and lone surrogates, which JSON parsers accept and jsonb refuses, are refused."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CallflowError(ErrorType.VALIDATION_ERROR, "The body holds text that is not valid Unicode.") from exc
        return value.replace("\x00", "")
    if isinstance(value, float) and not math.isfinite(value):
        raise CallflowError(ErrorType.VALIDATION_ERROR, "The body holds NaN or Infinity, which JSON does not allow.")
    if isinstance(value, list):
        return [_checked_storable(item) for item in value]
    if isinstance(value, dict):
        return {_checked_storable(key): _checked_storable(item) for key, item in value.items()}
    return value


def validation_error(exc: ValidationError) -> CallflowError:
    errors = [
        {"field": ".".join(str(part) for part in err["loc"]) or "body", "message": err["msg"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return CallflowError(
        ErrorType.VALIDATION_ERROR, f"Invalid request body: {summary}", problem_fields={"errors": errors}
    )
