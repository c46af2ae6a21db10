"""Trace propagation over AMQP: the `sentry-trace` and `baggage` headers that carry a trace between services."""

from __future__ import annotations

from collections.abc import Mapping

import sentry_sdk

TRACE_HEADERS = ("sentry-trace", "baggage")


def current_trace_headers() -> dict[str, str]:
    """The headers that continue the current trace in another process."""
    headers: dict[str, str] = {}
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
