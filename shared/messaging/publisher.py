"""Publishing with confirms and persistent messages.

pika connections are not thread-safe, so each thread gets its own, opened on first use (after any fork). A
publisher that must give up soon (`giving_up_after`) publishes from a thread of its own, which closes the connection
of a publish still unconfirmed at its deadline: pika's blocking connection has no bound on the wait for a confirm
but the heartbeat.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPError, UnroutableError

from shared.messaging.topology import EVENTS_EXCHANGE, HEARTBEAT_SECONDS, connection_parameters, declare_topology

log = logging.getLogger(__name__)

# How long past a publish's deadline its caller waits for the publishing thread to have closed the connection (a
# timer of that thread does it, at the deadline): ample for a thread that is merely not scheduled then.
LETTING_GO_SECONDS = 3.0


@dataclass(frozen=True)
class Envelope:
    message_type: str
    body: dict[str, Any]
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    headers: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode()

    def properties(self) -> pika.BasicProperties:
        return pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=self.message_id,
            type=self.message_type,
            headers=self.headers,
        )


class BrokerTooSlow(TimeoutError):
    """The broker did not take the message in the time the publisher may wait: unreachable, not answering, blocked
    (a memory or disk alarm), or slow to confirm."""


class Publisher:
    """Publishes with publisher confirms, persistent and mandatory: a return means the broker has it."""

    # A blocking connection answers heartbeats only while it is used: one idle longer than this may already
    # have been dropped by the broker, so it is replaced rather than trusted.
    MAX_IDLE_SECONDS = HEARTBEAT_SECONDS / 2

    def __init__(self, url: str, give_up_after: float | None = None):
        """`give_up_after`: the seconds one publish may take all told, connecting included, before it raises
        BrokerTooSlow; None waits as long as the connection settings let it. A publish given up on is abandoned
        before that is raised (unless its thread is starved for LETTING_GO_SECONDS): nothing of it is sent after its
        deadline, and the connection it went out on is closed at the deadline, so no confirm of it can come any
        more. It may still have reached the queue (AMQP cannot tell what became of a message sent but not
        confirmed): publishing it again makes delivery at least once."""
        if give_up_after is not None and give_up_after <= 0:
            raise ValueError(f"give_up_after must be a positive number of seconds, not {give_up_after!r}")
        self._url = url
        self._give_up_after = give_up_after
        self._local = threading.local()
        self._topology_declared = threading.Event()
        self._requests: queue.SimpleQueue[tuple[Future[None], Callable[[], None]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()

    def giving_up_after(self, seconds: float) -> Publisher:
        """A publisher to the same broker whose publishes raise BrokerTooSlow after `seconds`."""
        copy = Publisher(self._url, give_up_after=seconds)
        copy._topology_declared = self._topology_declared  # declared once per process, by whichever connects first
        return copy

    def _connection_parameters(self, deadline: float | None) -> list[pika.URLParameters]:
        if deadline is None or self._give_up_after is None:
            return connection_parameters(self._url)
        return connection_parameters(self._url, timeout=_seconds_left(deadline), blocked_timeout=self._give_up_after)

    def _channel(self, deadline: float | None) -> BlockingChannel:
        channel = getattr(self._local, "channel", None)
        idle = time.monotonic() - getattr(self._local, "last_used", 0.0)
        if channel is None or channel.is_closed or idle > self.MAX_IDLE_SECONDS:
            self._close_thread_connection(deadline)
            try:
                connection = pika.BlockingConnection(self._connection_parameters(deadline))
            except Exception as exc:  # pika raises its connector's own timeouts, which are no AMQPError
                if deadline is not None and time.monotonic() >= deadline:
                    raise BrokerTooSlow("the broker did not take a connection in time") from exc
                raise
            self._local.connection = connection  # so that it is closed should what follows fail
            with _abandoned_at(connection, deadline):
                channel = connection.channel()
                channel.confirm_delivery()
                if not self._topology_declared.is_set():  # durable: reconnects need not declare it again
                    declare_topology(channel)
                    self._topology_declared.set()
            self._local.channel = channel
        self._local.last_used = time.monotonic()
        return channel

    def publish(self, envelope: Envelope, exchange: str = EVENTS_EXCHANGE, routing_key: str | None = None) -> None:
        if self._give_up_after is None:
            self._publish(envelope, exchange, routing_key, deadline=None)
            return
        deadline = time.monotonic() + self._give_up_after
        done: Future[None] = Future()
        self._requests.put((done, lambda: self._publish(envelope, exchange, routing_key, deadline)))
        self._start_publishing_thread()
        try:
            # Past the deadline the publishing thread raises BrokerTooSlow itself, once it has let go of the message.
            done.result(self._give_up_after + LETTING_GO_SECONDS)
        except TimeoutError:
            done.cancel()  # still queued behind a publish the broker holds up: it is never sent
            raise BrokerTooSlow(f"the broker did not take the message within {self._give_up_after} s") from None

    def _start_publishing_thread(self) -> None:
        with self._thread_lock:
            if self._thread is None or not self._thread.is_alive():  # none yet in this process (after any fork)
                self._thread = threading.Thread(target=self._publish_requests, name="broker-publisher", daemon=True)
                self._thread.start()

    def _publish_requests(self) -> None:
        while True:
            done, publish = self._requests.get()
            if not done.set_running_or_notify_cancel():  # its caller gave up before it came up
                continue
            try:
                publish()
            except Exception as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

    def _publish(self, envelope: Envelope, exchange: str, routing_key: str | None, deadline: float | None) -> None:
        """`deadline`: the time.monotonic() by which the message is taken or abandoned; None waits as long as the
        connection settings let it."""
        # An idle connection may have been dropped by the broker (missed heartbeats): reconnect once.
        for attempt in (1, 2):
            try:
                channel = self._channel(deadline)
                if deadline is not None:
                    _seconds_left(deadline)  # raises once its caller may have given up: then nothing is sent
                with _abandoned_at(channel.connection, deadline):
                    channel.basic_publish(
                        exchange,
                        routing_key or envelope.message_type,
                        envelope.encode(),
                        envelope.properties(),
                        mandatory=True,
                    )
                return
            except UnroutableError:  # the broker returned it (no queue takes its type): the connection is fine
                raise
            except AMQPError:
                self._close_thread_connection(deadline)
                if attempt == 2:
                    raise

    def _close_thread_connection(self, deadline: float | None) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = self._local.channel = None
        if connection is not None and connection.is_open:
            try:
                with _abandoned_at(connection, deadline):  # a broker holding its answers never sends Close-Ok
                    connection.close()
            except (AMQPError, BrokerTooSlow):
                log.debug("closing a broken broker connection failed", exc_info=True)


def _seconds_left(deadline: float) -> float:
    """Until `deadline` (a time.monotonic()); raises BrokerTooSlow once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise BrokerTooSlow("the broker did not take the message in time")
    return left


@contextmanager
def _abandoned_at(connection: pika.BlockingConnection, deadline: float | None) -> Iterator[None]:
    """Closes `connection` at `deadline` (at once if it has passed) if what runs on it in the block still waits for
    the broker then, raising BrokerTooSlow in the block. The timer is one of the connection's own (those run while
    a blocking call waits), set as pika sets its blocked-connection timeout: pika offers no public one that runs
    there."""
    if deadline is None:
        yield
        return
    impl = connection._impl
    timer = impl._adapter_call_later(
        max(deadline - time.monotonic(), 0),
        lambda: impl._terminate_stream(BrokerTooSlow("the broker did not answer in time; connection closed")),
    )
    try:
        yield
    finally:
        impl._adapter_remove_timeout(timer)
