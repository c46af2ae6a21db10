"""Trace propagation over AMQP, and the spans of the messaging path.

Every publish is a `queue.publish` transaction whose `sentry-trace` and `baggage` travel in the AMQP headers; every
consume runs in a fresh isolation scope, continues that trace and opens a `queue.process` transaction with the
data Sentry's Queues view reads. A call keeps the trace its request started, and work done later for that call
(dispatch, webhooks) continues it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import sentry_sdk
from sentry_sdk.consts import OP, SPANDATA
from sentry_sdk.tracing import Span, Transaction
from sentry_sdk.utils import capture_internal_exceptions

from shared.messaging.topology import ATTEMPT_HEADER

TRACE_HEADERS = ("sentry-trace", "baggage")
PUBLISHED_AT_HEADER = "x-callflow-published-at-ms"  # AMQP's own timestamp has only second resolution
DELIVERY_COUNT_HEADER = "x-delivery-count"  # set by quorum queues on redelivery
MESSAGING_SYSTEM = "rabbitmq"
# Read by Sentry's Queues view; the SDK has no constant for it.
MESSAGE_BODY_SIZE = "messaging.message.body.size"


def current_trace_headers() -> dict[str, str]:
    """The headers that continue the current trace in another process."""
    headers: dict[str, str] = {}
    with capture_internal_exceptions():
        traceparent = sentry_sdk.get_traceparent()
        if traceparent:
            headers["sentry-trace"] = traceparent
        baggage = sentry_sdk.get_baggage()
        if baggage:
            headers["baggage"] = baggage
    return headers


def trace_headers_from(headers: Mapping[str, object] | None) -> dict[str, str]:
    """Picks the trace headers out of a message's AMQP headers."""
    if not headers:
        return {}
    return {name: str(headers[name]) for name in TRACE_HEADERS if headers.get(name)}


def trace_id_of(headers: Mapping[str, object] | None) -> str | None:
    traceparent = trace_headers_from(headers).get("sentry-trace", "")
    trace_id = traceparent.split("-", 1)[0]
    return trace_id if len(trace_id) == 32 else None


@contextmanager
def publish_span(
    stored_headers: Mapping[str, Any], destination: str, message_id: str, body_size: int
) -> Iterator[dict[str, Any]]:
    """A `queue.publish` transaction; yields the AMQP headers to send with the message.

    Messages are published after the change that caused them committed, apart from its request (the outbox): the
    transaction continues the trace the message was written in, so the message still belongs to that trace.
    """
    with sentry_sdk.isolation_scope(), _continued(stored_headers, OP.QUEUE_PUBLISH, destination) as span:
        yield _publish_headers(span, stored_headers, destination, message_id, body_size)


def _publish_headers(
    span: Span, stored_headers: Mapping[str, Any], destination: str, message_id: str, body_size: int
) -> dict[str, Any]:
    with capture_internal_exceptions():
        _set_message_data(span, destination, message_id, body_size)
    return {
        **stored_headers,
        **current_trace_headers(),
        PUBLISHED_AT_HEADER: int(time.time() * 1000),
    }


@contextmanager
def process_transaction(
    headers: Mapping[str, Any], queue: str, message_id: str | None, body_size: int, redelivered: bool
) -> Iterator[Span]:
    """A fresh isolation scope per message, with no breadcrumbs of the one before, continuing the publisher's
    trace."""
    with sentry_sdk.isolation_scope() as scope:
        scope.clear_breadcrumbs()
        with _continued(headers, OP.QUEUE_PROCESS, queue) as span:
            with capture_internal_exceptions():
                _set_message_data(span, queue, message_id, body_size)
                span.set_data(SPANDATA.MESSAGING_MESSAGE_RETRY_COUNT, _retry_count(headers, redelivered))
                published_at = headers.get(PUBLISHED_AT_HEADER)
                if isinstance(published_at, int):
                    latency = max(0, int(time.time() * 1000) - published_at)
                    span.set_data(SPANDATA.MESSAGING_MESSAGE_RECEIVE_LATENCY, latency)
            yield span


def _set_message_data(span: Span, destination: str, message_id: str | None, body_size: int) -> None:
    span.set_data(SPANDATA.MESSAGING_SYSTEM, MESSAGING_SYSTEM)
    span.set_data(SPANDATA.MESSAGING_DESTINATION_NAME, destination)
    span.set_data(SPANDATA.MESSAGING_MESSAGE_ID, message_id)
    span.set_data(MESSAGE_BODY_SIZE, body_size)


def _retry_count(headers: Mapping[str, Any], redelivered: bool) -> int:
    counts = (headers.get(ATTEMPT_HEADER), headers.get(DELIVERY_COUNT_HEADER))
    retries = sum(count for count in counts if isinstance(count, int))
    return retries or (1 if redelivered else 0)


@contextmanager
def call_transaction(
    call_trace_headers: Mapping[str, Any] | None, op: str, name: str, tags: Mapping[str, str] | None = None
) -> Iterator[Span]:
    """Runs the block as a transaction in the call's own trace: one trace per call, whatever service works on it.
    `tags` (the call's kind and campaign) go on everything the block reports.

    It gets an isolation scope of its own: continuing a trace changes the scope, and nothing of one call's work
    (trace, tags, breadcrumbs) may leak into the next piece of work in the same process.
    """
    with sentry_sdk.isolation_scope() as scope, _continued(call_trace_headers, op, name) as span:
        for key, value in (tags or {}).items():
            scope.set_tag(key, value)
            span.set_tag(key, value)
        yield span


@contextmanager
def _continued(headers: Mapping[str, Any] | None, op: str, name: str) -> Iterator[Span]:
    """A transaction continuing the trace in `headers`; a fault in reading them starts a new trace instead."""
    transaction: Transaction | None = None
    with capture_internal_exceptions():
        transaction = sentry_sdk.continue_trace(trace_headers_from(headers), op=op, name=name, source="task")
    with sentry_sdk.start_transaction(transaction or Transaction(op=op, name=name, source="task")) as span:
        yield span
