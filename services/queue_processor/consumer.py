"""A RabbitMQ consumer that survives the broker: manual acks after the work commits, reconnects with backoff,
retries failures after growing delays, and dead-letters what can never succeed, with the reason."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPError, UnroutableError
from sqlalchemy.exc import InterfaceError, OperationalError
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential

from shared.core.errors import CallflowError, ErrorType
from shared.messaging.topology import (
    ATTEMPT_HEADER,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_REASON_HEADER,
    ORIGINAL_QUEUE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    RETRY_DELAYS_SECONDS,
    RETRY_EXCHANGE,
    connection_parameters,
    declare_retry_queues,
    declare_topology,
    persistent_copy,
    retry_queue,
)
from shared.observability import tracing
from shared.observability.sentry import report, report_database_error

log = logging.getLogger(__name__)

HEALTHY_SECONDS = 30.0  # a connection lost after this long is a new outage: reconnecting starts at 0.5 s again


class PoisonMessage(Exception):
    """The message can never be processed (bad JSON, unknown type, missing fields): dead-letter it."""


@dataclass(frozen=True)
class IncomingMessage:
    message_id: str | None
    message_type: str | None
    body: bytes
    headers: dict[str, Any]
    queue: str
    redelivered: bool

    @property
    def attempt(self) -> int:
        value = self.headers.get(ATTEMPT_HEADER)
        return value if isinstance(value, int) and value >= 0 else 0

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body)
        except ValueError as exc:
            raise PoisonMessage(f"body is not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise PoisonMessage("body is not a JSON object")
        return value


Handler = Callable[[IncomingMessage], None]


class Consumer:
    def __init__(self, url: str, queue: str, handler: Handler, prefetch: int, stopping: threading.Event):
        self._url = url
        self._queue = queue
        self._handler = handler
        self._prefetch = prefetch
        self._stopping = stopping

    def run(self) -> None:
        """Consumes until `stopping` is set, reconnecting with growing delays (0.5 s to 30 s) whenever the broker
        goes away. A connection that stayed up for HEALTHY_SECONDS starts the delays over."""
        while not self._stopping.is_set():
            outage = Retrying(
                retry=retry_if_exception_type((AMQPError, OSError)),
                wait=wait_exponential(multiplier=0.5, max=30.0),
                sleep=self._stopping.wait,  # a stop cuts the wait short
                stop=lambda _: self._stopping.is_set(),
                before_sleep=_log_reconnect,
                retry_error_callback=lambda _: None,  # stopped while the broker was away
            )
            outage(self._consume_until_lost)

    def _consume_until_lost(self) -> None:
        """One connection's life. Raises when it was lost early (the outage goes on); returns when stopping, or
        when a connection that had been healthy is lost (a new outage begins)."""
        if self._stopping.is_set():
            return
        connection = self._open_consuming_connection()
        opened = time.monotonic()
        try:
            while not self._stopping.is_set():
                connection.process_data_events(time_limit=1)
        except (AMQPError, OSError) as exc:
            if time.monotonic() - opened < HEALTHY_SECONDS:
                raise
            log.warning("broker connection lost (%r); reconnecting", exc)
        finally:
            _close(connection)

    def _open_consuming_connection(self) -> pika.BlockingConnection:
        connection = pika.BlockingConnection(connection_parameters(self._url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            declare_topology(channel)
            declare_retry_queues(channel, self._queue)
            channel.basic_qos(prefetch_count=self._prefetch)
            channel.basic_consume(self._queue, self._on_message)
        except BaseException:
            _close(connection)
            raise
        log.info("consuming %s", self._queue)
        return connection

    def _on_message(self, channel: BlockingChannel, method, properties: pika.BasicProperties, body: bytes) -> None:
        message = IncomingMessage(
            message_id=properties.message_id,
            message_type=properties.type,
            body=body,
            headers=dict(properties.headers or {}),
            queue=self._queue,
            redelivered=bool(method.redelivered),
        )
        with tracing.process_transaction(
            message.headers, self._queue, message.message_id, len(body), message.redelivered
        ):
            self._handle(channel, method, properties, message)

    def _handle(self, channel: BlockingChannel, method, properties: pika.BasicProperties, message: IncomingMessage):
        try:
            self._handler(message)
        except PoisonMessage as exc:
            self._dead_letter(channel, method, properties, message.body, str(exc))
        except Exception as exc:
            if isinstance(exc, OperationalError | InterfaceError):
                report_database_error(exc, place=self._queue)
            self._retry_or_dead_letter(channel, method, properties, message, exc)
        else:
            channel.basic_ack(method.delivery_tag)

    def _retry_or_dead_letter(
        self,
        channel: BlockingChannel,
        method,
        properties: pika.BasicProperties,
        message: IncomingMessage,
        exc: Exception,
    ) -> None:
        """A failure that may pass (database away, a bug hit by bad timing) is retried after a growing delay."""
        attempt = message.attempt
        if attempt >= len(RETRY_DELAYS_SECONDS):
            reason = f"gave up after {attempt + 1} attempts: {exc!r}"
            self._dead_letter(channel, method, properties, message.body, reason, cause=exc)
            return
        delay = RETRY_DELAYS_SECONDS[attempt]
        log.warning("message %s failed (%r); retry %d in %ds", message.message_id, exc, attempt + 1, delay)
        retry = persistent_copy(properties, {**(properties.headers or {}), ATTEMPT_HEADER: attempt + 1})
        try:
            channel.basic_publish(RETRY_EXCHANGE, retry_queue(self._queue, delay), message.body, retry, mandatory=True)
        except UnroutableError:
            self._dead_letter(channel, method, properties, message.body, f"no retry queue; {exc!r}", cause=exc)
            return
        channel.basic_ack(method.delivery_tag)

    def _dead_letter(
        self,
        channel: BlockingChannel,
        method,
        properties: pika.BasicProperties,
        body: bytes,
        reason: str,
        cause: BaseException | None = None,
    ) -> None:
        dead = persistent_copy(
            properties,
            {
                **(properties.headers or {}),
                DEAD_LETTER_REASON_HEADER: reason[:1000],
                ORIGINAL_QUEUE_HEADER: self._queue,
                ORIGINAL_ROUTING_KEY_HEADER: method.routing_key,
            },
        )
        channel.basic_publish(DEAD_LETTER_EXCHANGE, method.routing_key, body, dead)
        channel.basic_ack(method.delivery_tag)
        report(
            CallflowError(
                ErrorType.MESSAGE_DEAD_LETTERED,
                f"Message {properties.message_id} from {self._queue} dead-lettered: {reason}",
                message_id=properties.message_id,
            ),
            cause=cause,
            place=self._queue,
        )


def _log_reconnect(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    delay = state.next_action.sleep if state.next_action else 0.0
    log.warning("broker unreachable (%r); reconnecting in %.1fs", exc, delay)


def _close(connection: pika.BlockingConnection) -> None:
    """Closing returns any unacknowledged message to the queue for another consumer; a broken one may refuse."""
    if connection.is_open:
        try:
            connection.close()
        except (AMQPError, OSError):
            log.debug("closing a broken broker connection failed", exc_info=True)
