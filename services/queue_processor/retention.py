"""Retention: what is kept only as long as it serves a purpose is deleted or redacted once its period has passed.

- Published outbox rows are deleted after OUTBOX_RETENTION_HOURS; unpublished rows are never touched.
- Stored webhooks (their payloads hold transcripts, phone numbers and user data) are redacted after
  WEBHOOK_PAYLOAD_RETENTION_DAYS: the payload becomes its ids, and the row stays so that its unique
  (execution id, status, attempt) still turns away a late duplicate. An event never applied is redacted only once it
  can no longer be applied either (the sweep retries kept events for `provider_events.KEPT_EVENT_RETENTION`).
- Idempotency keys are deleted after IDEMPOTENCY_KEY_RETENTION_HOURS (they stop being replayed at that moment).

Each step works in batches, each its own short transaction, so a large backlog never holds a long one; a step that
fails is reported on its own and the next steps still run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Executable, delete, func, or_, select, tuple_, update

from shared.calls.provider_events import KEPT_EVENT_RETENTION
from shared.core.config import Settings
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import IdempotencyKey, OutboxMessage, WebhookEvent
from shared.core.uow import UnitOfWorkFactory
from shared.observability.sentry import report

log = logging.getLogger(__name__)

BATCH_SIZE = 1000
MAX_BATCHES_PER_RUN = 100  # a larger backlog is worked off over the next runs


@dataclass(frozen=True)
class RetentionPeriods:
    outbox: timedelta
    webhook_payloads: timedelta
    idempotency_keys: timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPeriods:
        return cls(
            outbox=timedelta(hours=settings.outbox_retention_hours),
            webhook_payloads=timedelta(days=settings.webhook_payload_retention_days),
            idempotency_keys=timedelta(hours=settings.idempotency_key_retention_hours),
        )


class Retention:
    def __init__(
        self,
        uow_factory: UnitOfWorkFactory,
        periods: RetentionPeriods,
        batch_size: int = BATCH_SIZE,
        max_batches: int = MAX_BATCHES_PER_RUN,
    ):
        self._uow = uow_factory
        self._periods = periods
        self._batch_size = batch_size
        self._max_batches = max_batches

    def steps(self) -> dict[str, Callable[[], Executable]]:
        """Each step's name and the statement of its next batch (tests/integration/test_query_plans.py EXPLAINs
        them)."""
        return {
            "delete_published_outbox": self._published_outbox_batch,
            "redact_webhook_payloads": self._webhook_payloads_batch,
            "delete_expired_idempotency_keys": self._expired_idempotency_keys_batch,
        }

    def run(self) -> dict[str, int | None]:
        """Runs every step; returns the rows each touched (None for a step that failed, which is reported)."""
        touched: dict[str, int | None] = {}
        for name, batch in self.steps().items():
            try:
                touched[name] = self._in_batches(name, batch)
            except Exception as exc:  # one table's failure must not keep the others past their period
                touched[name] = None
                error = CallflowError(ErrorType.INTERNAL_ERROR, f"retention step {name} failed: {exc!r}")
                report(error, cause=exc, place=f"retention.{name}")
        return touched

    def _in_batches(self, name: str, batch: Callable[[], Executable]) -> int:
        total = 0
        for _ in range(self._max_batches):
            with self._uow() as uow:
                rows = uow.session.execute(batch()).rowcount
                uow.commit()
            total += rows
            if rows < self._batch_size:
                log.info("retention: %s touched %d rows", name, total)
                return total
        log.warning("retention: %s touched %d rows and stopped at its cap; the next run goes on", name, total)
        return total

    def _published_outbox_batch(self) -> Executable:
        ids = (
            select(OutboxMessage.id)
            .where(OutboxMessage.published_at < func.now() - self._periods.outbox)
            .limit(self._batch_size)
            .with_for_update(skip_locked=True, key_share=True)
        )
        return delete(OutboxMessage).where(OutboxMessage.id.in_(ids.scalar_subquery()))

    def _webhook_payloads_batch(self) -> Executable:
        period = self._periods.webhook_payloads
        # The sweep may still apply a kept event this young: it must find the event whole.
        applicable = max(period, KEPT_EVENT_RETENTION)
        ids = (
            select(WebhookEvent.id)
            .where(
                WebhookEvent.redacted_at.is_(None),
                WebhookEvent.received_at < func.now() - period,
                or_(WebhookEvent.applied_at.is_not(None), WebhookEvent.received_at < func.now() - applicable),
            )
            .limit(self._batch_size)
            # An event being applied right now is left for the next run.
            .with_for_update(skip_locked=True, key_share=True)
        )
        return (
            update(WebhookEvent)
            .where(WebhookEvent.id.in_(ids.scalar_subquery()))
            .values(
                payload=func.jsonb_build_object(
                    "id", WebhookEvent.execution_id, "status", WebhookEvent.status, "retry_count", WebhookEvent.attempt
                ),
                redacted_at=func.now(),
            )
        )

    def _expired_idempotency_keys_batch(self) -> Executable:
        expired = IdempotencyKey.expired(self._periods.idempotency_keys)
        keys = (
            select(IdempotencyKey.user_id, IdempotencyKey.key)
            .where(expired)
            .limit(self._batch_size)
            .with_for_update(skip_locked=True, key_share=True)
        )
        # `expired` again outside: PostgreSQL then reads only expired keys (by created_at), never the whole table.
        return delete(IdempotencyKey).where(expired, tuple_(IdempotencyKey.user_id, IdempotencyKey.key).in_(keys))
