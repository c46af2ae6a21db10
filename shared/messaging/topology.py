"""RabbitMQ's topology (exchanges, queues, retry and dead-letter queues) and the connections that use it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

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
    CAMPAIGN_STARTED = "campaign.started"  # a campaign was started or resumed: wake the dispatcher for its user
    ATTEMPT_ENDED = "attempt.ended"  # a campaign call ended after its slot was given back: settle its contact


DISPATCH_BINDINGS = (
    MessageType.CALL_QUEUED,
    MessageType.SLOT_RELEASED,
    MessageType.EXECUTION_STOP,
    MessageType.CAMPAIGN_STARTED,
    MessageType.ATTEMPT_ENDED,
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
