"""`Idempotency-Key` on POST /api/calls, with Stripe's semantics.

The same key and the same body replay the first answer (status and body) for 24 hours; the same key with another
body is refused (422); the same key while its first request still runs is refused (409). The key is claimed in
the transaction that creates the call, so one key can never make two calls.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from shared.errors import CallflowError, ErrorType
from shared.models import IdempotencyKey
from shared.uow import UnitOfWork

HEADER = "Idempotency-Key"
RETENTION = timedelta(hours=24)
_VALID_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, as the IETF draft's examples


@dataclass(frozen=True)
class Claim:
    user_id: uuid.UUID
    key: str
    request_hash: str


@dataclass(frozen=True)
class Replay:
    status: int
    body: dict[str, Any]


def claim_for(user_id: uuid.UUID, key: str, body: Any) -> Claim:
    if not _VALID_KEY.match(key):
        raise CallflowError(ErrorType.VALIDATION_ERROR, f"{HEADER} must be 1 to 255 printable ASCII characters.")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return Claim(user_id, key, hashlib.sha256(canonical.encode()).hexdigest())


def replay_of(claim: Claim) -> Replay | None:
    """The stored answer for this key, or None when the request should run. Refuses reuse and overlap."""
    with UnitOfWork() as uow:
        uow.session.execute(_expired(claim))
        row = uow.session.get(IdempotencyKey, (claim.user_id, claim.key))
        uow.commit()
    if row is None:
        return None
    if row.request_hash != claim.request_hash:
        raise CallflowError(
            ErrorType.IDEMPOTENCY_KEY_REUSED,
            f"{HEADER} {claim.key!r} was used with a different request body.",
            user_id=claim.user_id,
        )
    if row.response_status is None or row.response_body is None:
        raise _in_progress(claim, row.call_id)
    return Replay(row.response_status, row.response_body)


def claim(session: Session, claim: Claim, call_id: uuid.UUID) -> None:
    """Claims the key in the caller's transaction; a concurrent request with the same key waits, then gets 409."""
    claimed = session.execute(
        pg_insert(IdempotencyKey)
        .values(user_id=claim.user_id, key=claim.key, request_hash=claim.request_hash, call_id=call_id)
        .on_conflict_do_nothing()
        .returning(IdempotencyKey.key)
    ).first()
    if claimed is None:
        raise _in_progress(claim, None)


def record(claim: Claim, status: int, body: dict[str, Any]) -> None:
    with UnitOfWork() as uow:
        uow.session.execute(
            update(IdempotencyKey)
            .where(
                IdempotencyKey.user_id == claim.user_id,
                IdempotencyKey.key == claim.key,
                IdempotencyKey.response_status.is_(None),
            )
            .values(response_status=status, response_body=body)
        )
        uow.commit()


def purge_expired() -> int:
    with UnitOfWork() as uow:
        purged = uow.session.execute(
            delete(IdempotencyKey).where(IdempotencyKey.created_at < func.now() - RETENTION)
        ).rowcount
        uow.commit()
    return purged


def _expired(claim: Claim):
    return delete(IdempotencyKey).where(
        IdempotencyKey.user_id == claim.user_id,
        IdempotencyKey.key == claim.key,
        IdempotencyKey.created_at < func.now() - RETENTION,
    )


def _in_progress(claim: Claim, call_id: uuid.UUID | None) -> CallflowError:
    error = CallflowError(
        ErrorType.IDEMPOTENCY_KEY_IN_PROGRESS,
        f"A request with {HEADER} {claim.key!r} is still being processed; retry shortly.",
        user_id=claim.user_id,
    )
    if call_id is not None:
        error.problem_extras = {"callId": str(call_id)}
    return error
