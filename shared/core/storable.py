"""JSON values as PostgreSQL's jsonb can hold them: what Bolna sends (a webhook, or an answer of its API) is made
storable rather than refused, because refusing a `completed` would lose it and its charge."""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_JSON_DEPTH = 32
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a pair is already one character once parsed


def storable(value: Any, depth: int = 1) -> Any:
    """`value` with NaN and Infinity as null, lone surrogates as U+FFFD, U+0000 dropped, and whatever is nested
    deeper than MAX_JSON_DEPTH as null."""
    if depth > MAX_JSON_DEPTH:
        return None
    if isinstance(value, str):
        if not value.isascii():  # only text beyond ASCII can hold a surrogate: the common case skips the search
            value = _LONE_SURROGATE.sub("\ufffd", value)
        return value.replace("\x00", "")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [storable(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {storable(key, depth): storable(item, depth + 1) for key, item in value.items()}
    return value


MAX_USER_DATA_BYTES = 16 * 1024  # a call's metadata, or a campaign contact's variables: what Bolna gets as user_data


def bounded_user_data(value: dict[str, Any]) -> dict[str, Any]:
    """A validator: `value` when its JSON fits in MAX_USER_DATA_BYTES."""
    if len(json.dumps(value)) > MAX_USER_DATA_BYTES:
        raise ValueError(f"must be at most {MAX_USER_DATA_BYTES} bytes of JSON")
    return value
