"""Sentry: the one setup every service calls at start, and `report` for the errors of the error table."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sentry_sdk
from flask import has_request_context, request
from sentry_sdk.crons import monitor
from sentry_sdk.integrations import sqlalchemy as sdk_sqlalchemy
from sentry_sdk.integrations.flask import FlaskIntegration
from sentry_sdk.integrations.logging import LoggingIntegration, ignore_logger
from sentry_sdk.integrations.sqlalchemy import SqlalchemyIntegration
from sentry_sdk.types import Event, Hint, Log
from sentry_sdk.utils import capture_internal_exceptions
from sqlalchemy import event as sqlalchemy_events
from sqlalchemy.engine import Engine
from werkzeug.exceptions import HTTPException

from shared.core.config import Settings
from shared.core.errors import ERROR_TABLE, CallflowError, Capture, ErrorSpec, ErrorType
from shared.messaging.topology import broker_refuses
from shared.observability import scrubbing

log = logging.getLogger(__name__)
# report() logs each error it sends; that log line must not become a second event. pika logs a dropped
# connection at ERROR although the publisher and the consumer reconnect by themselves. gunicorn writes a request's
# access line after the request's isolation scope has closed, on the thread's own scope, which the next request's
# scope is copied from: as a breadcrumb it would reach later requests' events, never its own.
report_log = logging.getLogger("callflow.report")
for _logger in (report_log.name, "pika", "pika.*", "gunicorn.access"):
    ignore_logger(_logger)

# Tags every event may carry, when the error knows them.
ID_TAGS = ("user_id", "call_id", "campaign_id", "agent_id", "execution_id", "message_id")
HEALTH_PATH = "/health"

# Errors anyone can cause at will, without a credential. Sent unchecked, a scanner would spend the Sentry quota and
# push the SDK into the rate-limit back-off that holds back every event, `credit_deduction_failed` included.
UNAUTHENTICATED_ERRORS = frozenset({ErrorType.WEBHOOK_AUTH_FAILED, ErrorType.WEBHOOK_SOURCE_FORBIDDEN})
THROTTLE_WINDOW_SECONDS = 60.0
EVENTS_PER_TYPE = 10  # per window and process, whatever the source: a scanner rotating addresses is capped too


class _ProcessIdentity:
    """Set once by `init_sentry`: the service this process runs, the secrets its events must never carry, and
    whether its periodic jobs check in with Crons."""

    service = "callflow"
    secrets: tuple[str, ...] = ()
    crons = True


class EventThrottle:
    """Which reports of an unauthenticated error become events: in any window, one per error type and source
    address, and at most `per_type` per error type. The rest are counted, and the next event of the type carries
    the count.

    Only sources that were sent an event in the current window are remembered, so the memory it holds is bounded
    by `per_type` for each error type, however many addresses a scanner uses.
    """

    def __init__(
        self,
        window_seconds: float = THROTTLE_WINDOW_SECONDS,
        per_type: int = EVENTS_PER_TYPE,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._window = window_seconds
        self._per_type = per_type
        self._clock = clock
        self._lock = threading.Lock()
        self._sent: OrderedDict[tuple[str, str], float] = OrderedDict()  # (type, source) -> sent at, oldest first
        self._sent_by_type: dict[str, deque[float]] = {}
        self._suppressed_since_event: Counter[str] = Counter()
        self._suppressed_since_start: Counter[str] = Counter()

    def admit(self, error_type: str, source: str) -> dict[str, int] | None:
        """None when this report is only counted; else the counts its event carries."""
        now = self._clock()
        with self._lock:
            self._forget_before(now - self._window)
            sent = self._sent_by_type.setdefault(error_type, deque())
            if (error_type, source) in self._sent or len(sent) >= self._per_type:
                self._suppressed_since_event[error_type] += 1
                self._suppressed_since_start[error_type] += 1
                return None
            self._sent[(error_type, source)] = now
            sent.append(now)
            return {
                "since_last_event": self._suppressed_since_event.pop(error_type, 0),
                "since_start": self._suppressed_since_start[error_type],
            }

    @property
    def remembered(self) -> int:
        """How many (error type, source) pairs it holds."""
        return len(self._sent)

    def _forget_before(self, cutoff: float) -> None:
        while self._sent and next(iter(self._sent.values())) <= cutoff:
            self._sent.popitem(last=False)
        for sent in self._sent_by_type.values():
            while sent and sent[0] <= cutoff:
                sent.popleft()


class _Unauthenticated:
    """This process's throttle of unauthenticated errors; `init_sentry` starts it afresh."""

    throttle = EventThrottle()


class _DatabaseOutage:
    """Whether this process has already reported the database as down (reported once per outage)."""

    down = False
    lock = threading.Lock()


class SampledSqlalchemyIntegration(SqlalchemyIntegration):
    """The SDK's SQLAlchemy instrumentation, run only inside a sampled transaction. Elsewhere a statement is only a
    breadcrumb: the SDK would otherwise build, time and drop a span for every statement of every unsampled request,
    the largest part of what Sentry costs a request that sends nothing. It keeps the SDK's identifier, so the SDK
    enables this one in place of its own; a statement it traces is traced by the SDK's own listeners."""

    @staticmethod
    def setup_once() -> None:
        sqlalchemy_events.listen(Engine, "before_cursor_execute", _before_cursor_execute)
        sqlalchemy_events.listen(Engine, "after_cursor_execute", _after_cursor_execute)
        sqlalchemy_events.listen(Engine, "handle_error", sdk_sqlalchemy._handle_error)


# Set on a statement's execution context when the SDK's listener made it a span, which the SDK's own listener
# closes once the statement has run.
_TRACED_BY_SDK = "_callflow_traced_by_sdk"


def _before_cursor_execute(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, *args: Any) -> None:
    span = sentry_sdk.get_current_span()
    if span is not None and span.sampled:
        sdk_sqlalchemy._before_cursor_execute(conn, cursor, statement, parameters, context, *args)
        setattr(context, _TRACED_BY_SDK, True)
        return
    with capture_internal_exceptions():
        sentry_sdk.add_breadcrumb(message=statement, category="query")


def _after_cursor_execute(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, *args: Any) -> None:
    if getattr(context, _TRACED_BY_SDK, False):
        sdk_sqlalchemy._after_cursor_execute(conn, cursor, statement, parameters, context, *args)


def sending_enabled(settings: Settings) -> bool:
    return bool(settings.sentry_dsn) and (
        settings.sentry_environment == "production" or settings.sentry_send_in_development
    )


def init_sentry(service: str, settings: Settings, http_transactions: bool = True) -> bool:
    """Initialises the SDK for `service`; returns whether events are sent.

    `http_transactions`: whether the service's HTTP requests are transactions. The webhook-receiver's are not: each
    webhook's work is a transaction of its own in the trace of the call it concerns, and its other routes are
    probes, never sampled. A transaction around the request would only be built, sampled out and dropped, on every
    webhook. Its requests keep their isolation scope, request data and a trace of their own (`shared/http/app.py`).
    """
    _ProcessIdentity.service = service
    _ProcessIdentity.secrets = tuple(s for s in (settings.webhook_secret, settings.bolna_api_key) if len(s) >= 6)
    _ProcessIdentity.crons = settings.sentry_crons
    _Unauthenticated.throttle = EventThrottle()
    enabled = sending_enabled(settings)
    if enabled:
        _start_client(settings, http_transactions)
    else:
        # Not initialised at all: with no client, spans, breadcrumbs and sampling decisions cost nothing.
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)
    sentry_sdk.get_global_scope().set_tag("service", service)
    why = (
        ""
        if enabled
        else (
            " (no SENTRY_DSN)"
            if not settings.sentry_dsn
            else f" (environment {settings.sentry_environment!r}; set SENTRY_SEND_IN_DEVELOPMENT=true to send)"
        )
    )
    log.info("Sentry initialized: enabled: %s%s", enabled, why)
    return enabled


def _start_client(settings: Settings, http_transactions: bool) -> None:
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment,
        release=settings.sentry_release or None,  # None: the SDK takes the git commit when it can find one
        traces_sampler=lambda context: _sample(context, settings.sentry_traces_sample_rate),
        # No outgoing HTTP request carries trace headers: Bolna and any other third party learn nothing of our
        # traces. Traces cross processes only over AMQP (`tracing.py`), which this option does not govern.
        trace_propagation_targets=[],
        profiles_sample_rate=settings.sentry_profiles_sample_rate,
        enable_logs=settings.sentry_enable_logs,
        send_default_pii=settings.sentry_send_default_pii,
        max_request_body_size="never",  # request bodies hold phone numbers and user data
        include_local_variables=False,  # locals hold tokens and payloads
        before_send=_before_send,
        before_send_transaction=_before_send_transaction,
        before_send_log=_before_send_log,  # SENTRY_ENABLE_LOGS: log records hold phone numbers and keys too
        integrations=[
            _flask_integration(http_transactions),
            SampledSqlalchemyIntegration(),
            LoggingIntegration(level=logging.INFO, event_level=logging.ERROR),
        ],
    )


def _flask_integration(http_transactions: bool) -> FlaskIntegration:
    if http_transactions:
        return FlaskIntegration(transaction_style="url")  # the SDK's default methods are transactions
    return FlaskIntegration(transaction_style="url", http_methods_to_capture=())  # no method is


def sentry_status(settings: Settings) -> dict[str, Any]:
    """What /health says about Sentry."""
    options = sentry_sdk.get_client().options
    return {
        "configured": bool(settings.sentry_dsn),
        "enabled": bool(sentry_sdk.get_client().dsn),
        "environment": settings.sentry_environment,
        "release": options.get("release"),
        "traces_sample_rate": settings.sentry_traces_sample_rate,
        "profiles_sample_rate": settings.sentry_profiles_sample_rate,
    }


def report(
    error: CallflowError, cause: BaseException | None = None, place: str | None = None, source: str | None = None
) -> None:
    """Reports an error of the table: as an event, or as a breadcrumb on whatever event follows.

    The fingerprint is the error type and the place it happened, so each failure groups into one issue per place.
    `source` is the client's address when a request caused the error: unauthenticated errors are throttled by it
    (`EventThrottle`), and those held back become breadcrumbs. An event is logged first; as in the SDK's own
    integrations, a fault in building it never breaks the caller.
    """
    spec = error.spec
    if cause is not None and error.__cause__ is None:
        error.__cause__ = cause
    if spec.capture is Capture.BREADCRUMB or not _admitted(error, source):
        with capture_internal_exceptions():
            sentry_sdk.add_breadcrumb(
                category="callflow.error", message=f"{error.error_type}: {error.detail}", level=spec.level
            )
        return
    where = place or _current_place()
    report_log.log(
        logging.ERROR if spec.level in ("error", "fatal") else logging.WARNING,
        "%s at %s: %s",
        error.error_type,
        where,
        error.detail,
    )
    with capture_internal_exceptions():
        _capture(error, spec, where)


def _admitted(error: CallflowError, source: str | None) -> bool:
    """Whether an event may be sent for this error; the event of a throttled one carries what was held back."""
    if error.error_type not in UNAUTHENTICATED_ERRORS:
        return True
    suppressed = _Unauthenticated.throttle.admit(error.error_type, source or "unknown")
    if suppressed is None:
        return False
    error.sentry_contexts["suppressed"] = suppressed
    return True


def _capture(error: CallflowError, spec: ErrorSpec, where: str) -> None:
    with sentry_sdk.new_scope() as scope:
        scope.level = spec.level
        scope.set_tag("error_type", error.error_type)
        scope.set_tag("severity", spec.severity)
        scope.set_tag("category", spec.category)
        for key in ID_TAGS:
            if key in error.tags:
                scope.set_tag(key, str(error.tags[key]))
        for name, context in error.sentry_contexts.items():
            scope.set_context(name, context)
        scope.fingerprint = [str(error.error_type), where]
        sentry_sdk.capture_exception(error)


def report_database_error(cause: BaseException, place: str | None = None) -> None:
    """Reports a database outage once: the first failure is an event, the rest breadcrumbs until it recovers."""
    with _DatabaseOutage.lock:
        first = not _DatabaseOutage.down
        _DatabaseOutage.down = True
    error = CallflowError(ErrorType.DATABASE_ERROR, f"The database is unavailable: {type(cause).__name__}")
    if first:
        report(error, cause=cause, place=place)
    else:
        sentry_sdk.add_breadcrumb(category="callflow.error", message=str(error), level="error")


class FirstTimes:
    """The keys (a status, a message type) this process has met, so what each one shows is reported the first time
    only: a cause that comes with every call is one event, not one per call. Bounded: past `limit` keys, none is
    new any more."""

    def __init__(self, limit: int = 100) -> None:
        self._seen: set[str] = set()
        self._limit = limit
        self._lock = threading.Lock()

    def first(self, key: str) -> bool:
        with self._lock:
            if key in self._seen or len(self._seen) >= self._limit:
                return False
            self._seen.add(key)
            return True


class _BrokerRefusals:
    """Where in this process the broker's refusal has been reported (once there, until a connection is accepted)."""

    places: set[str] = set()
    lock = threading.Lock()


def report_broker_failure(cause: BaseException, place: str) -> None:
    """Reports a failure to reach the broker that no retry mends (`topology.broker_refuses`) once at `place`, then
    logs it, until a connection there is accepted again (`broker_accepted`): the services keep trying, and only
    someone's fix ends it. One that passes is its caller's to log: the outbox and the sweeps make up for a broker
    away for a while."""
    if not broker_refuses(cause):
        return
    with _BrokerRefusals.lock:
        first = place not in _BrokerRefusals.places
        _BrokerRefusals.places.add(place)
    if first:
        detail = f"RabbitMQ refuses Callflow: {type(cause).__name__}: {cause}"[:1000]
        report(CallflowError(ErrorType.BROKER_REFUSED, detail), cause=cause, place=place)
    else:
        log.warning("RabbitMQ still refuses Callflow at %s: %r", place, cause)


def broker_accepted(place: str) -> None:
    if place in _BrokerRefusals.places:
        with _BrokerRefusals.lock:
            _BrokerRefusals.places.discard(place)
        log.info("RabbitMQ accepts Callflow again at %s", place)


def database_recovered() -> None:
    if _DatabaseOutage.down:
        with _DatabaseOutage.lock:
            _DatabaseOutage.down = False
        log.info("the database is reachable again")


@contextmanager
def cron(slug: str, interval_seconds: float) -> Iterator[None]:
    """A Sentry Crons check-in around one run of a periodic job (none with SENTRY_CRONS off)."""
    if not _ProcessIdentity.crons:
        yield
        return
    minutes = max(1, round(interval_seconds / 60))
    config = {
        "schedule": {"type": "interval", "value": minutes, "unit": "minute"},
        "checkin_margin": 5,
        "max_runtime": 10,
    }
    with monitor(monitor_slug=slug, monitor_config=config):
        yield


def _current_place() -> str:
    """The transaction's name; in a request that is no transaction (every request to the webhook-receiver, or any
    service's with Sentry off), its route, as the transaction is named (`transaction_style="url"`)."""
    transaction = sentry_sdk.get_current_scope().transaction
    if transaction is not None and transaction.name:
        return transaction.name
    if has_request_context() and request.url_rule is not None:
        return request.url_rule.rule
    return _ProcessIdentity.service


def _is_health(path: object) -> bool:
    """Probes are never traced: `/health`, `/health/live`, `/health/ready`."""
    return path in (HEALTH_PATH, f"{HEALTH_PATH}/live", f"{HEALTH_PATH}/ready")


def _sample(context: dict[str, Any], rate: float) -> float:
    """The parent's decision where there is one: only internal hops (AMQP messages, a call's stored trace) have one,
    since the HTTP edge drops clients' trace headers (`shared/http/app.py`). Probes are never sampled."""
    environ = context.get("wsgi_environ") or {}
    if _is_health(environ.get("PATH_INFO")):
        return 0.0
    parent = context.get("parent_sampled")
    return float(parent) if parent is not None else rate


def _expected(hint: Hint) -> bool:
    """Errors that are part of normal operation: client errors and the table's breadcrumb-only types."""
    exc_info = hint.get("exc_info")
    exc = exc_info[1] if exc_info else None
    if isinstance(exc, HTTPException):
        return (exc.code or 500) < 500
    if isinstance(exc, CallflowError):
        return ERROR_TABLE[exc.error_type].capture is Capture.BREADCRUMB
    return False


def _before_send(event: Event, hint: Hint) -> Event | None:
    if _expected(hint):
        return None
    exc_info = hint.get("exc_info")
    if exc_info and isinstance(exc_info[1], CallflowError):
        with capture_internal_exceptions():
            _name_the_failure(event, exc_info[1].error_type)
    return _scrubbed(event)


def exception_type_name(error_type: ErrorType) -> str:
    """What an error type is called as an exception: `agent_not_found` is `AgentNotFound`."""
    return "".join(word.capitalize() for word in str(error_type).split("_"))


def _name_the_failure(event: Event, error_type: ErrorType) -> None:
    """An issue's title is its exception's type and message: the type names the error type, not `CallflowError`,
    so the issue list reads as the error table. Grouping is unchanged: the fingerprint is set apart (`_capture`).
    The raised exception is the last of the chain; the causes before it keep their own types."""
    raised = event["exception"]["values"][-1]
    if raised.get("type") == CallflowError.__name__:
        raised["type"] = exception_type_name(error_type)


def _before_send_transaction(event: Event, hint: Hint) -> Event | None:
    if _is_health(event.get("transaction")):
        return None
    return _scrubbed(event)


def _before_send_log(record: Log, hint: Hint) -> Log | None:
    return _scrubbed(record)


def _scrubbed(value: Any) -> Any:
    with capture_internal_exceptions():
        return scrubbing.scrub(value, _ProcessIdentity.secrets)
    return None  # scrubbing failed: better to send nothing than something unscrubbed
