"""`Idempotency-Key` on POST /api/calls and POST /api/campaigns, with Stripe's semantics: claiming a key, replaying
its answer, and recording the answer.

The same key and the same body replay the first answer (status and body) for IDEMPOTENCY_KEY_RETENTION_HOURS (24
by default); the same key with another body is refused (422); the same key while its first request still runs is
refused (409). The key is claimed in the transaction that creates the call, so one key can never make two calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from flask import Response, g, jsonify, request
from sqlalchemy import delete, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from shared.core.db import database_unavailable
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import IdempotencyKey
from shared.core.uow import UnitOfWorkFactory
from shared.http.app import PROBLEM_JSON
from shared.observability.sentry import report, report_database_error

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
VALID_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, as the IETF draft's examples


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
    if not VALID_KEY.match(key):
        raise CallflowError(ErrorType.VALIDATION_ERROR, f"{HEADER} must be 1 to 255 printable ASCII characters.")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return Claim(user_id, key, hashlib.sha256(canonical.encode()).hexdigest())


def replay_of(uow_factory: UnitOfWorkFactory, claim: Claim, retention: timedelta) -> Replay | None:
    """The stored answer for this key, or None when the request should run (a key older than `retention` is
    forgotten). Refuses reuse and overlap."""
    with uow_factory() as uow:
        uow.session.execute(_expired(claim, retention))
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


@dataclass(frozen=True)
class Begun:
    """What a request with a body that makes a call or a campaign starts with: its claim on the key (None without
    the header), or the first answer to replay instead of running it."""

    claim: Claim | None = None
    replay: Response | None = None


def begin(uow_factory: UnitOfWorkFactory, user_id: uuid.UUID, body: Any, retention: timedelta) -> Begun:
    """Reads the request's `Idempotency-Key`; a claim is remembered (`g`) so the answer can be recorded after."""
    key = request.headers.get(HEADER)
    if key is None:
        return Begun()
    claim = claim_for(user_id, key, body)
    if (replay := replay_of(uow_factory, claim, retention)) is not None:
        return Begun(claim, replayed(replay))
    g.idempotency_claim = claim
    return Begun(claim)


def replayed(replay: Replay) -> Response:
    response = jsonify(replay.body)
    response.status_code = replay.status
    if replay.status >= 400:
        response.content_type = PROBLEM_JSON
    response.headers["Idempotent-Replayed"] = "true"
    return response


def claim_key(
    session: Session, claim: Claim, call_id: uuid.UUID | None = None, campaign_id: uuid.UUID | None = None
) -> None:
    """Claims the key for the call (or campaign) the caller's transaction creates; a concurrent request with the
    same key waits, then gets 409."""
    claimed = session.execute(
        pg_insert(IdempotencyKey)
        .values(
            user_id=claim.user_id,
            key=claim.key,
            request_hash=claim.request_hash,
            call_id=call_id,
            campaign_id=campaign_id,
        )
        .on_conflict_do_nothing()
        .returning(IdempotencyKey.key)
    ).first()
    if claimed is None:
        raise _in_progress(claim, None)


def record(uow_factory: UnitOfWorkFactory, claim: Claim, response: Response) -> None:
    """Stores the answer of a request that made a call, errors included.

    Recording must never change the answer: a call Bolna has placed still answers 201 when this fails. Its key
    then answers 409 with the callId until it expires, so a retry cannot make a second call.
    """
    body = response.get_json(silent=True) if response.is_json else None
    if response.status_code == 409 or not isinstance(body, dict) or not ({"callId", "campaignId"} & body.keys()):
        return
    try:
        _store_answer(uow_factory, claim, response.status_code, body)
    except (OperationalError, InterfaceError) as exc:  # the call is placed and answered; only the replay is lost
        if database_unavailable(exc):
            report_database_error(exc, place="idempotency.record")
        else:
            report(CallflowError(ErrorType.INTERNAL_ERROR, f"Recording an answer failed: {exc.orig!r}"), cause=exc)
    except Exception:
        log.exception("recording the answer for %s %r failed", HEADER, claim.key)


def _store_answer(uow_factory: UnitOfWorkFactory, claim: Claim, status: int, body: dict[str, Any]) -> None:
    with uow_factory() as uow:
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


def _expired(claim: Claim, retention: timedelta):
    return delete(IdempotencyKey).where(
        IdempotencyKey.user_id == claim.user_id,
        IdempotencyKey.key == claim.key,
        IdempotencyKey.expired(retention),
    )


def _in_progress(claim: Claim, call_id: uuid.UUID | None) -> CallflowError:
    return CallflowError(
        ErrorType.IDEMPOTENCY_KEY_IN_PROGRESS,
        f"A request with {HEADER} {claim.key!r} is still being processed; retry shortly.",
        problem_fields={"callId": str(call_id)} if call_id is not None else None,
        user_id=claim.user_id,
    )
