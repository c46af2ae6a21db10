"""RabbitMQ: the topology, and a publisher with confirms and persistent messages.

pika connections are not thread-safe, so each thread gets its own, opened on first use (after any fork).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPError

log = logging.getLogger(__name__)

EVENTS_EXCHANGE = "callflow.events"
DEAD_LETTER_EXCHANGE = "callflow.dead-letter"
RETRY_EXCHANGE = "callflow.retry"
DISPATCH_QUEUE = "callflow.dispatch"
DEAD_LETTER_QUEUE = "callflow.dead-letter"
DEAD_LETTER_REASON_HEADER = "x-callflow-dead-letter-reason"
ORIGINAL_QUEUE_HEADER = "x-callflow-original-queue"
ORIGINAL_ROUTING_KEY_HEADER = "x-callflow-original-routing-key"
ATTEMPT_HEADER = "x-callflow-attempt"  # how many times the message has failed and been retried
HEARTBEAT_SECONDS = 30
# A message that keeps failing is retried after each of these delays, then dead-lettered.
RETRY_DELAYS_SECONDS = (1, 5, 30)


class MessageType(StrEnum):
    CALL_QUEUED = "call.queued"  # a call waits for a slot: wake the dispatcher for its user
    SLOT_RELEASED = "slot.released"  # a slot came free: dispatch the user's next pending call
    EXECUTION_STOP = "execution.stop"  # ask Bolna to stop an execution it redialled on its own


DISPATCH_BINDINGS = (MessageType.CALL_QUEUED, MessageType.SLOT_RELEASED, MessageType.EXECUTION_STOP)


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


def connection_parameters(url: str) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.heartbeat = HEARTBEAT_SECONDS
    params.blocked_connection_timeout = 10  # a broker out of memory or disk must not hang a request for long
    params.socket_timeout = 5
    params.connection_attempts = 1
    return params


def declare_topology(channel: BlockingChannel) -> None:
    """Idempotent: every service calls it at start, so it runs against an empty vhost."""
    channel.exchange_declare(EVENTS_EXCHANGE, "topic", durable=True)
    channel.exchange_declare(DEAD_LETTER_EXCHANGE, "fanout", durable=True)
    channel.queue_declare(DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE)
    channel.queue_declare(
        DISPATCH_QUEUE,
        durable=True,
        arguments={"x-queue-type": "quorum", "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE},
    )
    for message_type in DISPATCH_BINDINGS:
        channel.queue_bind(DISPATCH_QUEUE, EVENTS_EXCHANGE, routing_key=message_type)
    declare_retry_queues(channel, DISPATCH_QUEUE)


def retry_queue(queue: str, delay_seconds: int) -> str:
    return f"{queue}.retry.{delay_seconds}s"


def declare_retry_queues(channel: BlockingChannel, queue: str) -> None:
    """Delay queues for `queue`: a message waits out its TTL there, then returns to `queue` by dead-lettering."""
    channel.exchange_declare(RETRY_EXCHANGE, "direct", durable=True)
    for delay in RETRY_DELAYS_SECONDS:
        name = retry_queue(queue, delay)
        channel.queue_declare(
            name,
            durable=True,
            arguments={
                "x-message-ttl": delay * 1000,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": queue,
            },
        )
        channel.queue_bind(name, RETRY_EXCHANGE, routing_key=name)


@contextmanager
def open_channel(url: str) -> Iterator[BlockingChannel]:
    """A confirmed channel on a fresh connection, the topology declared; closing it returns unacked messages."""
    connection = pika.BlockingConnection(connection_parameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        declare_topology(channel)
        yield channel
    finally:
        connection.close()


def declare_topology_at(url: str) -> None:
    with open_channel(url):
        pass


def persistent_copy(properties: pika.BasicProperties, headers: dict[str, Any]) -> pika.BasicProperties:
    """The message's properties with other headers, for sending it on (to a retry, the dead letters, back)."""
    return pika.BasicProperties(
        content_type=properties.content_type,
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=properties.message_id,
        type=properties.type,
        headers=headers,
    )


def ping(url: str) -> None:
    pika.BlockingConnection(connection_parameters(url)).close()


class Publisher:
    """Publishes with publisher confirms, persistent and mandatory: a return means the broker has it."""

    # A blocking connection answers heartbeats only while it is used: one idle longer than this may already
    # have been dropped by the broker, so it is replaced rather than trusted.
    MAX_IDLE_SECONDS = HEARTBEAT_SECONDS / 2

    def __init__(self, url: str):
        self._url = url
        self._local = threading.local()
        self._declared = False

    def _channel(self) -> BlockingChannel:
        channel = getattr(self._local, "channel", None)
        idle = time.monotonic() - getattr(self._local, "last_used", 0.0)
        if channel is None or channel.is_closed or idle > self.MAX_IDLE_SECONDS:
            self._close_thread_connection()
            connection = pika.BlockingConnection(connection_parameters(self._url))
            channel = connection.channel()
            channel.confirm_delivery()
            if not self._declared:  # once per process: the topology is durable, reconnects need not redo it
                declare_topology(channel)
                self._declared = True
            self._local.connection, self._local.channel = connection, channel
        self._local.last_used = time.monotonic()
        return channel

    def publish(self, envelope: Envelope, exchange: str = EVENTS_EXCHANGE, routing_key: str | None = None) -> None:
        # An idle connection may have been dropped by the broker (missed heartbeats): reconnect once.
        for attempt in (1, 2):
            try:
                self._channel().basic_publish(
                    exchange,
                    routing_key or envelope.message_type,
                    envelope.encode(),
                    envelope.properties(),
                    mandatory=True,
                )
                return
            except AMQPError:
                self._close_thread_connection()
                if attempt == 2:
                    raise

    def _close_thread_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = self._local.channel = None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except AMQPError:
                log.debug("closing a broken broker connection failed", exc_info=True)
