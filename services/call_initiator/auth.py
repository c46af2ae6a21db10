"""Who is calling the API: a bearer API token, compared by its SHA-256 hash (the only form stored)."""

from __future__ import annotations

import sentry_sdk
from sqlalchemy import bindparam, select

from shared.core.errors import CallflowError, ErrorType
from shared.core.models import User
from shared.core.tokens import hash_token
from shared.core.uow import UnitOfWorkFactory

# Built once: every API request runs it (see shared/calls/provider_events.py, _STORE_EVENT).
_USER_BY_TOKEN = select(User).where(User.api_token_hash == bindparam("token_hash"))


def authenticate(uow_factory: UnitOfWorkFactory, authorization: str | None) -> User:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise CallflowError(ErrorType.UNAUTHORIZED, "Send 'Authorization: Bearer <api token>'.")
    with uow_factory() as uow:
        user = uow.reads_only().session.scalar(_USER_BY_TOKEN, {"token_hash": hash_token(token.strip())})
    if user is None:
        raise CallflowError(ErrorType.UNAUTHORIZED, "The API token is not valid.")
    sentry_sdk.set_tag("user_id", str(user.id))
    sentry_sdk.set_user({"id": str(user.id)})
    return user
