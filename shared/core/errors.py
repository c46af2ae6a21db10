"""The error table: the single source of truth for every error Callflow reports.

Each row says how bad it is, how it is answered over HTTP, and how it reaches Sentry.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Severity(StrEnum):
    CRITICAL = "critical"
    HIGH = "high"
    WARNING = "warning"
    INFO = "info"


class Capture(StrEnum):
    EVENT = "event"  # sent to Sentry as an event
    BREADCRUMB = "breadcrumb"  # recorded only as a breadcrumb on whatever event follows


class ErrorType(StrEnum):
    UNAUTHORIZED = "unauthorized"
    VALIDATION_ERROR = "validation_error"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    CALL_NOT_FOUND = "call_not_found"
    AGENT_NOT_FOUND = "agent_not_found"
    UNAUTHORIZED_AGENT_ACCESS = "unauthorized_agent_access"
    AGENT_NOT_CONFIGURED = "agent_not_configured"
    INSUFFICIENT_CREDITS = "insufficient_credits"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    IDEMPOTENCY_KEY_IN_PROGRESS = "idempotency_key_in_progress"
    UNAUTHORIZED_CALL_ACCESS = "unauthorized_call_access"
    CAMPAIGN_NOT_FOUND = "campaign_not_found"
    UNAUTHORIZED_CAMPAIGN_ACCESS = "unauthorized_campaign_access"
    INVALID_CAMPAIGN_TRANSITION = "invalid_campaign_transition"
    WEBHOOK_SOURCE_FORBIDDEN = "webhook_source_forbidden"
    CONCURRENCY_LIMIT = "concurrency_limit"
    BOLNA_API_FAILURE = "bolna_api_failure"
    BOLNA_UNAVAILABLE = "bolna_unavailable"
    CALL_INITIATION_FAILED = "call_initiation_failed"
    EMPTY_WEBHOOK_PAYLOAD = "empty_webhook_payload"
    MISSING_EXECUTION_ID = "missing_execution_id"
    INVALID_WEBHOOK_PAYLOAD = "invalid_webhook_payload"
    WEBHOOK_AUTH_FAILED = "webhook_auth_failed"
    WEBHOOK_PROCESSING_FAILED = "webhook_processing_failed"
    DIRECT_CALL_QUEUE_FAILURE = "direct_call_queue_failure"
    CAMPAIGN_CALL_QUEUE_FAILURE = "campaign_call_queue_failure"
    CREDIT_DEDUCTION_FAILED = "credit_deduction_failed"
    DATABASE_ERROR = "database_error"
    BROKER_REFUSED = "broker_refused"
    SLOT_LEASE_EXPIRED = "slot_lease_expired"
    BOLNA_OUTCOME_UNKNOWN = "bolna_outcome_unknown"
    BOLNA_REDIALLED = "bolna_redialled"
    BOLNA_CALL_ERROR = "bolna_call_error"
    BOLNA_BALANCE_LOW = "bolna_balance_low"
    BILLING_DURATION_MISSING = "billing_duration_missing"
    MESSAGE_DEAD_LETTERED = "message_dead_lettered"
    OUTBOX_STALLED = "outbox_stalled"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True)
class ErrorSpec:
    title: str
    severity: Severity
    level: str  # the Sentry level
    capture: Capture
    category: str
    http_status: int | None = None


_EVENT, _BREADCRUMB = Capture.EVENT, Capture.BREADCRUMB
_CRITICAL, _HIGH, _WARNING, _INFO = Severity.CRITICAL, Severity.HIGH, Severity.WARNING, Severity.INFO

ERROR_TABLE: dict[ErrorType, ErrorSpec] = {
    ErrorType.UNAUTHORIZED: ErrorSpec("Unauthorized", _INFO, "info", _BREADCRUMB, "security", 401),
    ErrorType.VALIDATION_ERROR: ErrorSpec("Invalid request", _INFO, "info", _BREADCRUMB, "validation", 400),
    ErrorType.NOT_FOUND: ErrorSpec("Not found", _INFO, "info", _BREADCRUMB, "validation", 404),
    ErrorType.METHOD_NOT_ALLOWED: ErrorSpec("Method not allowed", _INFO, "info", _BREADCRUMB, "validation", 405),
    ErrorType.PAYLOAD_TOO_LARGE: ErrorSpec("Payload too large", _INFO, "info", _BREADCRUMB, "validation", 413),
    ErrorType.CALL_NOT_FOUND: ErrorSpec("Call not found", _INFO, "info", _BREADCRUMB, "business", 404),
    ErrorType.AGENT_NOT_FOUND: ErrorSpec("Agent not found", _CRITICAL, "error", _EVENT, "configuration", 404),
    ErrorType.UNAUTHORIZED_AGENT_ACCESS: ErrorSpec(
        "Agent belongs to another user", _HIGH, "error", _EVENT, "security", 403
    ),
    ErrorType.AGENT_NOT_CONFIGURED: ErrorSpec(
        "Agent has no provider agent id", _HIGH, "error", _EVENT, "configuration", 422
    ),
    ErrorType.INSUFFICIENT_CREDITS: ErrorSpec("Insufficient credits", _INFO, "info", _BREADCRUMB, "business", 402),
    ErrorType.IDEMPOTENCY_KEY_REUSED: ErrorSpec(
        "Idempotency key reused with another body", _INFO, "info", _BREADCRUMB, "validation", 422
    ),
    ErrorType.IDEMPOTENCY_KEY_IN_PROGRESS: ErrorSpec(
        "Request with this idempotency key in progress", _INFO, "info", _BREADCRUMB, "validation", 409
    ),
    ErrorType.UNAUTHORIZED_CALL_ACCESS: ErrorSpec(
        "Call belongs to another user", _HIGH, "error", _EVENT, "security", 404
    ),
    ErrorType.CAMPAIGN_NOT_FOUND: ErrorSpec("Campaign not found", _INFO, "info", _BREADCRUMB, "business", 404),
    ErrorType.UNAUTHORIZED_CAMPAIGN_ACCESS: ErrorSpec(
        "Campaign belongs to another user", _HIGH, "error", _EVENT, "security", 404
    ),
    ErrorType.INVALID_CAMPAIGN_TRANSITION: ErrorSpec(
        "Campaign cannot make this move", _INFO, "info", _BREADCRUMB, "validation", 409
    ),
    ErrorType.WEBHOOK_SOURCE_FORBIDDEN: ErrorSpec(
        "Webhook from an address not allowed", _HIGH, "error", _EVENT, "security", 403
    ),
    ErrorType.CONCURRENCY_LIMIT: ErrorSpec(
        "Concurrent-call limit reached; call queued", _WARNING, "warning", _BREADCRUMB, "business"
    ),
    ErrorType.BOLNA_API_FAILURE: ErrorSpec("Bolna API request failed", _CRITICAL, "error", _EVENT, "provider", 502),
    ErrorType.BOLNA_UNAVAILABLE: ErrorSpec(
        "Bolna keeps failing or refuses Callflow's key", _CRITICAL, "fatal", _EVENT, "provider"
    ),
    ErrorType.CALL_INITIATION_FAILED: ErrorSpec("Call initiation failed", _HIGH, "error", _EVENT, "provider", 500),
    ErrorType.EMPTY_WEBHOOK_PAYLOAD: ErrorSpec("Empty webhook payload", _WARNING, "warning", _EVENT, "validation", 400),
    ErrorType.MISSING_EXECUTION_ID: ErrorSpec(
        "Webhook without execution id", _WARNING, "warning", _EVENT, "validation", 400
    ),
    ErrorType.INVALID_WEBHOOK_PAYLOAD: ErrorSpec(
        "Webhook that cannot be used", _WARNING, "warning", _EVENT, "validation", 400
    ),
    ErrorType.WEBHOOK_AUTH_FAILED: ErrorSpec("Webhook authentication failed", _HIGH, "error", _EVENT, "security", 401),
    ErrorType.WEBHOOK_PROCESSING_FAILED: ErrorSpec("Webhook processing failed", _HIGH, "error", _EVENT, "webhook"),
    ErrorType.DIRECT_CALL_QUEUE_FAILURE: ErrorSpec("Queued direct call failed", _HIGH, "error", _EVENT, "queue"),
    ErrorType.CAMPAIGN_CALL_QUEUE_FAILURE: ErrorSpec("Queued campaign call failed", _HIGH, "error", _EVENT, "queue"),
    ErrorType.CREDIT_DEDUCTION_FAILED: ErrorSpec("Credit deduction failed", _CRITICAL, "fatal", _EVENT, "revenue"),
    ErrorType.DATABASE_ERROR: ErrorSpec("Database unavailable", _CRITICAL, "fatal", _EVENT, "infrastructure", 503),
    ErrorType.BROKER_REFUSED: ErrorSpec("RabbitMQ refuses Callflow", _CRITICAL, "fatal", _EVENT, "infrastructure"),
    ErrorType.SLOT_LEASE_EXPIRED: ErrorSpec("Call slot lease expired", _WARNING, "warning", _EVENT, "reliability"),
    ErrorType.BOLNA_OUTCOME_UNKNOWN: ErrorSpec(
        "Bolna may have placed the call but nothing confirms it", _HIGH, "error", _EVENT, "provider"
    ),
    ErrorType.BOLNA_REDIALLED: ErrorSpec("Bolna dialled a call again on its own", _HIGH, "error", _EVENT, "provider"),
    ErrorType.BOLNA_CALL_ERROR: ErrorSpec("Bolna ended a call in error", _HIGH, "error", _EVENT, "provider"),
    ErrorType.BOLNA_BALANCE_LOW: ErrorSpec(
        "Bolna's balance is too low to place calls", _CRITICAL, "fatal", _EVENT, "provider"
    ),
    ErrorType.BILLING_DURATION_MISSING: ErrorSpec(
        "Completed call without a billable duration", _HIGH, "error", _EVENT, "revenue"
    ),
    ErrorType.MESSAGE_DEAD_LETTERED: ErrorSpec("Message dead-lettered", _HIGH, "error", _EVENT, "queue"),
    ErrorType.OUTBOX_STALLED: ErrorSpec("Messages wait in the outbox", _HIGH, "error", _EVENT, "queue"),
    ErrorType.INTERNAL_ERROR: ErrorSpec("Internal error", _HIGH, "error", _EVENT, "bug", 500),
}


class CallflowError(Exception):
    """An error of a known type.

    `tags` hold ids (call_id, user_id, ...) that become tags of its Sentry report; `sentry_contexts` are the
    report's structured contexts (call_details, bolna_api, ...); `problem_fields` are extra members of the HTTP
    problem answer (such as the callId a client can look up).
    """

    def __init__(
        self,
        error_type: ErrorType,
        detail: str,
        *,
        sentry_contexts: dict[str, dict[str, object]] | None = None,
        problem_fields: dict[str, object] | None = None,
        **tags: object,
    ):
        super().__init__(detail)
        self.error_type = error_type
        self.detail = detail
        self.tags = {key: value for key, value in tags.items() if value is not None}
        self.sentry_contexts = sentry_contexts or {}
        self.problem_fields = problem_fields or {}

    @property
    def spec(self) -> ErrorSpec:
        return ERROR_TABLE[self.error_type]
