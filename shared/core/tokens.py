"""API tokens: random, shown once, stored only as a SHA-256 hash (they are high-entropy, so no salt is needed)."""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "cf_"


def new_api_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
