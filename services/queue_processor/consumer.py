"""A RabbitMQ consumer that survives the broker: manual acks after the work commits, reconnects with backoff,
retries failures after growing delays, and dead-letters what can never succeed, with the reason.

The handler runs on a thread of its own, one message at a time in delivery order, while the consumer's thread goes
on serving the connection (answering heartbeats, however long a message takes); acks and publishes are handed back
to that thread, the only one that may use a pika connection.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPError, ConsumerCancelled, UnroutableError
from pika.spec import Basic
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential

from shared.core.db import database_unavailable
from shared.core.errors import CallflowError, ErrorType
from shared.messaging.topology import (
    ATTEMPT_HEADER,
    BROKER_AWAY,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_REASON_HEADER,
    DELIVERY_COUNT_HEADER,
    DISPATCH_DELIVERY_LIMIT,
    HEARTBEAT_SECONDS,
    ORIGINAL_QUEUE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    OUTAGE_WAITS_HEADER,
    RETRY_DELAYS_SECONDS,
    RETRY_EXCHANGE,
    connection_parameters,
    declare_retry_queues,
    declare_topology,
    persistent_copy,
    retry_queue,
)
from shared.observability import tracing
from shared.observability.sentry import broker_accepted, report, report_broker_failure, report_database_error

log = logging.getLogger(__name__)
T = TypeVar("T")

CONSUMER_PLACE = "broker.consume"  # where the broker's refusal to let the consumer in is reported
# A message waits out a database outage this many times (30 s each: two hours) before it uses up attempts again.
OUTAGE_WAIT_LIMIT = 240
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
    # When this process took delivery (time.monotonic()); None: not known, and nothing is inferred from it.
    received_at: float | None = None

    @property
    def attempt(self) -> int:
        return self._count(ATTEMPT_HEADER)

    @property
    def outage_waits(self) -> int:
        return self._count(OUTAGE_WAITS_HEADER)

    def _count(self, header: str) -> int:
        value = self.headers.get(header)
        return value if isinstance(value, int) and value >= 0 else 0

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body)
        except (ValueError, RecursionError) as exc:  # nested past the parser's depth is no JSON it can read either
            raise PoisonMessage(f"body is not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise PoisonMessage("body is not a JSON object")
        return value


Handler = Callable[[IncomingMessage], None]


@dataclass(frozen=True)
class _Delivery:
    channel: BlockingChannel
    method: Basic.Deliver
    properties: pika.BasicProperties
    body: bytes
    received_at: float  # time.monotonic(), as pika handed it over


class ConnectionLost(AMQPError):
    """The connection went away before a message was settled: the broker delivers it again."""


def process_events(connection: pika.BlockingConnection) -> None:
    """Handles the connection's I/O for up to a second. pika raises a ValueError ("Timeout closed before call")
    when the connection was lost and its I/O loop already closed: that is the connection lost, as any other."""
    try:
        connection.process_data_events(time_limit=1)
    except ValueError as exc:
        if connection.is_open:
            raise
        raise ConnectionLost(f"the broker connection was lost: {exc}") from exc


class _HandlerThread:
    """Handles one connection's deliveries, one at a time in the order they came, on a thread of its own.

    The consumer's thread hands it deliveries (`submit`) and keeps serving the connection until it is `idle`; the
    handling thread runs pika calls back on the consumer's thread (`on_connection_thread`). Once the connection is
    `lost` those calls raise ConnectionLost; once it is lost, or settling a message failed, what is left unhandled is
    skipped: the broker delivers it again.
    """

    def __init__(
        self,
        connection: pika.BlockingConnection,
        handle: Callable[[_Delivery, _HandlerThread], None],
        stopping: threading.Event,
    ):
        self._connection = connection
        self._handle = handle
        self._stopping = stopping
        self._deliveries: queue.SimpleQueue[_Delivery | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._unsettled = 0  # delivered and not yet handled or skipped
        self._is_lost = False
        self._failure: Exception | None = None
        self._waiting: Future[Any] | None = None
        self._thread = threading.Thread(target=self._run, name="message-handler", daemon=True)
        self._thread.start()

    def submit(self, delivery: _Delivery) -> None:
        with self._lock:
            self._unsettled += 1
        self._deliveries.put(delivery)

    def idle(self) -> bool:
        """Nothing in hand; once stopping, what is still queued is skipped (the broker gets it back)."""
        with self._lock:
            return self._unsettled == 0

    def on_connection_thread(self, operation: Callable[[], T]) -> T:
        """Runs `operation` on the consumer's thread and returns what it returned (or raises what it raised)."""
        done: Future[T] = Future()

        def run() -> None:
            try:
                done.set_result(operation())
            except Exception as exc:
                done.set_exception(exc)

        with self._lock:
            if self._is_lost:
                raise ConnectionLost("the broker connection was lost")
            try:
                self._connection.add_callback_threadsafe(run)
            except AMQPError as exc:  # closed, and the consumer's thread is about to learn it
                raise ConnectionLost("the broker connection was lost") from exc
            self._waiting = done
        try:
            return done.result()
        finally:
            with self._lock:
                self._waiting = None

    def lost(self) -> None:
        """Called on the consumer's thread once it no longer serves the connection; waits for the message in hand."""
        with self._lock:
            self._is_lost = True
            if self._waiting is not None and not self._waiting.done():
                self._waiting.set_exception(ConnectionLost("the broker connection was lost"))
        self._deliveries.put(None)
        self._thread.join()

    def raise_failure(self) -> None:
        """Raises, on the consumer's thread, what went wrong settling a message (a channel the broker closed): the
        connection is dropped, as if the broker had dropped it, and the message delivered again."""
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        while (delivery := self._deliveries.get()) is not None:
            try:
                if not (self._is_lost or self._failure or self._stopping.is_set()):
                    self._handle(delivery, self)
            except ConnectionLost:
                log.warning("broker connection lost before message %s was settled", delivery.properties.message_id)
            except Exception as exc:
                self._failure = exc
            finally:
                with self._lock:
                    self._unsettled -= 1


class Consumer:
    def __init__(
        self,
        url: str,
        queue: str,
        handler: Handler,
        prefetch: int,
        stopping: threading.Event,
        heartbeat_seconds: int = HEARTBEAT_SECONDS,
    ):
        self._url = url
        self._queue = queue
        self._handler = handler
        self._prefetch = prefetch
        self._stopping = stopping
        self._heartbeat_seconds = heartbeat_seconds

    def run(self) -> None:
        """Consumes until `stopping` is set, reconnecting with growing delays (0.5 s to 30 s) whenever the broker
        goes away. A connection that stayed up for HEALTHY_SECONDS starts the delays over."""
        while not self._stopping.is_set():
            outage = Retrying(
                retry=retry_if_exception_type(BROKER_AWAY),
                wait=wait_exponential(multiplier=0.5, max=30.0),
                sleep=self._stopping.wait,  # a stop cuts the wait short
                stop=lambda _: self._stopping.is_set(),
                before_sleep=_log_reconnect,
                retry_error_callback=lambda _: None,  # stopped while the broker was away
            )
            outage(self._consume_until_lost)

    def _consume_until_lost(self) -> None:
        """One connection's life. Raises when it was lost early (the outage goes on); returns when stopping (once
        the message in hand is settled), or when a connection that had been healthy is lost (a new outage begins)."""
        if self._stopping.is_set():
            return
        connection = self._connect()
        handler_thread = _HandlerThread(connection, self._process, self._stopping)
        # The broker stops delivering when the queue is deleted or the node holding it fails, and the connection
        # lives on (pika swallows what its callback raises): it is taken as lost, so consuming starts again on a new
        # one, the queue declared anew.
        cancelled = threading.Event()
        opened = time.monotonic()
        try:
            self._start_consuming(connection, handler_thread, lambda *_: cancelled.set())
            broker_accepted(CONSUMER_PLACE)
            while not (self._stopping.is_set() and handler_thread.idle()):
                process_events(connection)
                handler_thread.raise_failure()
                if cancelled.is_set():
                    raise ConsumerCancelled(f"the broker cancelled consuming {self._queue}")
        except BROKER_AWAY as exc:
            if time.monotonic() - opened < HEALTHY_SECONDS:
                raise
            log.warning("broker connection lost (%r); reconnecting", exc)
        finally:
            handler_thread.lost()
            _close(connection)

    def _connect(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(connection_parameters(self._url, heartbeat=self._heartbeat_seconds))

    def _start_consuming(
        self, connection: pika.BlockingConnection, handler_thread: _HandlerThread, on_cancel: Callable[..., None]
    ) -> None:
        channel = connection.channel()
        channel.confirm_delivery()
        declare_topology(channel)
        declare_retry_queues(channel, self._queue)
        channel.basic_qos(prefetch_count=self._prefetch)
        channel.add_on_cancel_callback(on_cancel)
        channel.basic_consume(
            self._queue,
            lambda channel, method, properties, body: handler_thread.submit(
                _Delivery(channel, method, properties, body, time.monotonic())
            ),
        )
        log.info("consuming %s", self._queue)

    def _process(self, delivery: _Delivery, connection_thread: _HandlerThread) -> None:
        properties = delivery.properties
        message = IncomingMessage(
            message_id=properties.message_id,
            message_type=properties.type,
            body=delivery.body,
            headers=dict(properties.headers or {}),
            queue=self._queue,
            redelivered=bool(delivery.method.redelivered),
            received_at=delivery.received_at,
        )
        with tracing.process_transaction(
            message.headers, self._queue, message.message_id, len(delivery.body), message.redelivered
        ):
            self._handle(delivery, message, connection_thread)

    def _handle(self, delivery: _Delivery, message: IncomingMessage, connection_thread: _HandlerThread) -> None:
        returned = message.headers.get(DELIVERY_COUNT_HEADER)
        if isinstance(returned, int) and returned >= DISPATCH_DELIVERY_LIMIT:
            reason = f"given back unsettled {returned} times: handling it loses the connection or the process"
            self._dead_letter(delivery, reason, connection_thread)
            return
        try:
            self._handler(message)
        except PoisonMessage as exc:
            self._dead_letter(delivery, str(exc), connection_thread)
        except Exception as exc:
            unavailable = database_unavailable(exc)
            if unavailable:
                report_database_error(exc, place=self._queue)
            if unavailable and message.outage_waits < OUTAGE_WAIT_LIMIT:
                # An outage uses up no attempt: the message waits it out (within a bound: one whose own handling
                # kills its database connection every time must not wait forever).
                waits = {OUTAGE_WAITS_HEADER: message.outage_waits + 1}
                self._retry(delivery, message, exc, connection_thread, RETRY_DELAYS_SECONDS[-1], message.attempt, waits)
            else:
                self._retry_or_dead_letter(delivery, message, exc, connection_thread)
        else:
            connection_thread.on_connection_thread(lambda: delivery.channel.basic_ack(delivery.method.delivery_tag))

    def _retry_or_dead_letter(
        self, delivery: _Delivery, message: IncomingMessage, exc: Exception, connection_thread: _HandlerThread
    ) -> None:
        """A failure that may pass (database away, a bug hit by bad timing) is retried after a growing delay."""
        attempt = message.attempt
        if attempt >= len(RETRY_DELAYS_SECONDS):
            self._dead_letter(delivery, f"gave up after {attempt + 1} attempts: {exc!r}", connection_thread, exc)
            return
        self._retry(delivery, message, exc, connection_thread, RETRY_DELAYS_SECONDS[attempt], attempt + 1)

    def _retry(
        self,
        delivery: _Delivery,
        message: IncomingMessage,
        exc: Exception,
        connection_thread: _HandlerThread,
        delay: int,
        attempt: int,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Sends the message back to its queue through the retry queue of `delay`, as its `attempt`."""
        log.warning("message %s failed (%r); again in %ds, as attempt %d", message.message_id, exc, delay, attempt)
        properties = delivery.properties
        retry = persistent_copy(properties, {**(properties.headers or {}), ATTEMPT_HEADER: attempt, **(headers or {})})
        try:
            _forward_then_ack(delivery, RETRY_EXCHANGE, retry_queue(self._queue, delay), retry, connection_thread)
        except UnroutableError:
            self._dead_letter(delivery, f"no retry queue; {exc!r}", connection_thread, exc)

    def _dead_letter(
        self, delivery: _Delivery, reason: str, connection_thread: _HandlerThread, cause: BaseException | None = None
    ) -> None:
        properties, routing_key = delivery.properties, delivery.method.routing_key
        dead = persistent_copy(
            properties,
            {
                **(properties.headers or {}),
                DEAD_LETTER_REASON_HEADER: reason[:1000],
                ORIGINAL_QUEUE_HEADER: self._queue,
                ORIGINAL_ROUTING_KEY_HEADER: routing_key,
            },
        )

        _forward_then_ack(delivery, DEAD_LETTER_EXCHANGE, routing_key, dead, connection_thread, mandatory=False)
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
    if exc is not None:
        report_broker_failure(exc, place=CONSUMER_PLACE)


def _close(connection: pika.BlockingConnection) -> None:
    """Closing returns any unacknowledged message to the queue for another consumer; a broken one may refuse."""
    if connection.is_open:
        try:
            connection.close()
        except BROKER_AWAY:
            log.debug("closing a broken broker connection failed", exc_info=True)


def _forward_then_ack(
    delivery: _Delivery,
    exchange: str,
    routing_key: str,
    properties: pika.BasicProperties,
    connection_thread: _HandlerThread,
    mandatory: bool = True,
) -> None:
    """Publishes the delivery's body onward, then acks the delivery, on the connection's own thread (pika's
    channels are not thread-safe); a message is acked only once its copy is confirmed."""

    def forward_then_ack() -> None:
        delivery.channel.basic_publish(exchange, routing_key, delivery.body, properties, mandatory=mandatory)
        delivery.channel.basic_ack(delivery.method.delivery_tag)

    connection_thread.on_connection_thread(forward_then_ack)
