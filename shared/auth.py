"""API tokens: random, shown once, stored only as a SHA-256 hash (they are high-entropy, so no salt is needed)."""

from __future__ import annotations

import hashlib
import secrets

import sentry_sdk
from sqlalchemy import select

from shared.errors import CallflowError, ErrorType
from shared.models import User
from shared.uow import UnitOfWork

TOKEN_PREFIX = "cf_"


def new_api_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authenticate(authorization: str | None) -> User:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise CallflowError(ErrorType.UNAUTHORIZED, "Send 'Authorization: Bearer <api token>'.")
    with UnitOfWork() as uow:
        user = uow.session.scalar(select(User).where(User.api_token_hash == hash_token(token.strip())))
    if user is None:
        raise CallflowError(ErrorType.UNAUTHORIZED, "The API token is not valid.")
    sentry_sdk.set_tag("user_id", str(user.id))
    sentry_sdk.set_user({"id": str(user.id)})
    return user
