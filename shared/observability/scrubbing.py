"""What never leaves a service in a Sentry event: secrets, tokens, full phone numbers, transcripts, user_data.

The SDK's EventScrubber only looks at some parts of an event (not tags or contexts), so every string and every
key of the whole event is checked here.
"""

from __future__ import annotations

import re
from typing import Any

FILTERED = "[Filtered]"

# Keys whose values are dropped wherever they appear (compared lower-case, with '-' read as '_').
SENSITIVE_KEYS = frozenset(
    {
        "authorization",
        "proxy_authorization",
        "cookie",
        "set_cookie",
        "token",
        "api_token",
        "api_key",
        "apikey",
        "x_api_key",
        "access_token",
        "refresh_token",
        "secret",
        "webhook_secret",
        "client_secret",
        "password",
        "passwd",
        "pwd",
        "private_key",
        "bolna_api_key",
        "sentry_dsn",
        "database_url",
        "rabbitmq_url",
        "dsn",
        "transcript",
        "user_data",
        "context_details",
        "recipient_data",
        "metadata",
        "extracted_data",
    }
)

_PATTERNS = (
    # ?token=... and friends in URLs and query strings.
    (re.compile(r"(?i)\b((?:token|api_key|apikey|secret|password|access_token)=)[^&\s'\"]+"), rf"\1{FILTERED}"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), rf"\1 {FILTERED}"),
    (re.compile(r"\bcf_[A-Za-z0-9_-]{16,}"), FILTERED),  # Callflow API tokens
    (re.compile(r"(?i)(amqps?|postgres(?:ql)?(?:\+\w+)?)://[^:@/\s]+:[^@/\s]+@"), rf"\1://{FILTERED}@"),
)
# E.164 numbers, also URL-encoded (%2B, or %2b: percent-encoding is not case-sensitive): all but the last four
# digits are masked.
_PHONE = re.compile(r"(\+|%2[Bb])([1-9]\d{6,14})\b")
# Where any pattern above can match: most strings of an event (SQL, span names, ids) hold none of these, and one
# search costs a fraction of the substitutions. ASCII text is searched lower-cased, with the alternatives factored
# by their first letter: several times faster than a case-insensitive search, on every string of every event sent.
# Other text keeps the case-insensitive search, whose Unicode case folding also reads 'ſ' as 's' and 'ı' as 'i'.
_MAY_HOLD_SENSITIVE_ASCII = re.compile(
    r"token=|a(?:pi_?key|ccess_token)=|secret=|password=|b(?:earer|asic)|cf_|://|\+[1-9]|%2b[1-9]"
)
_MAY_HOLD_SENSITIVE = re.compile(
    r"(?i)(?:token|api_key|apikey|secret|password|access_token)=|bearer|basic|cf_|://|\+[1-9]|%2B[1-9]"
)


def mask_phone(number: str) -> str:
    digits = number.lstrip("+")
    return "+" + "*" * max(0, len(digits) - 4) + digits[-4:]


def scrub_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, FILTERED)
    if not _may_hold_sensitive(text):
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return _PHONE.sub(lambda m: mask_phone("+" + m.group(2)), text)


def _may_hold_sensitive(text: str) -> bool:
    if text.isascii():
        return _MAY_HOLD_SENSITIVE_ASCII.search(text.lower()) is not None
    return _MAY_HOLD_SENSITIVE.search(text) is not None


def scrub(value: Any, secrets: tuple[str, ...] = ()) -> Any:
    """A copy of `value` (an event, or any part of one) with everything sensitive removed or masked."""
    if isinstance(value, dict):
        return {
            key: FILTERED if _is_sensitive(key) and value[key] not in (None, "") else scrub(item, secrets)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [scrub(item, secrets) for item in value]
    if isinstance(value, str):
        return scrub_text(value, secrets)
    return value


def _is_sensitive(key: object) -> bool:
    return isinstance(key, str) and key.lower().replace("-", "_") in SENSITIVE_KEYS
