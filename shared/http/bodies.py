"""Request bodies: JSON as PostgreSQL can store it, within size and depth limits; validation errors answered
with every field that failed."""

from __future__ import annotations

import math
from typing import Any

from flask import request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from shared.core.errors import CallflowError, ErrorType

MAX_JSON_DEPTH = 32


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
    return _storable(body)


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth <= MAX_JSON_DEPTH:
            children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _storable(value: Any) -> Any:
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
        return [_storable(item) for item in value]
    if isinstance(value, dict):
        return {_storable(key): _storable(item) for key, item in value.items()}
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
