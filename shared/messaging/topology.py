"""RabbitMQ's topology (exchanges, queues, retry and dead-letter queues) and the connections that use it."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.connection_workflow import AMQPConnectorException
from pika.exceptions import (
    AMQPError,
    ChannelClosedByBroker,
    ConnectionClosedByBroker,
    ProbableAccessDeniedError,
    ProbableAuthenticationError,
)

EVENTS_EXCHANGE = "callflow.events"
DEAD_LETTER_EXCHANGE = "callflow.dead-letter"
RETRY_EXCHANGE = "callflow.retry"
DISPATCH_QUEUE = "callflow.dispatch"
DEAD_LETTER_QUEUE = "callflow.dead-letters"
DEAD_LETTER_REASON_HEADER = "x-callflow-dead-letter-reason"
ORIGINAL_QUEUE_HEADER = "x-callflow-original-queue"
ORIGINAL_ROUTING_KEY_HEADER = "x-callflow-original-routing-key"
ATTEMPT_HEADER = "x-callflow-attempt"  # how many times the message has failed and been retried
OUTAGE_WAITS_HEADER = "x-callflow-outage-waits"  # how many times it waited out a database outage, using no attempt
HEADERS_DROPPED_HEADER = "x-callflow-headers-dropped"  # a copy too large for a frame kept only Callflow's headers
CALLFLOW_HEADER_PREFIX = "x-callflow-"
# How many times a quorum queue gave the message back unsettled (a connection or a process lost while it was held).
DELIVERY_COUNT_HEADER = "x-delivery-count"
# A message `callflow.dispatch` gave back this often is dead-lettered rather than handled again: handling it keeps
# losing the connection (or the process), and every message behind it waits. RabbitMQ 4's default delivery limit.
DISPATCH_DELIVERY_LIMIT = 20
# The properties of a copy sent on stay within half of RabbitMQ's default frame (131,072 bytes): its content header
# travels in one frame.
COPY_PROPERTIES_MAX_BYTES = pika.spec.FRAME_MAX_SIZE // 2
HEARTBEAT_SECONDS = 30
PING_TIMEOUT_SECONDS = 1.0  # per node, for readiness
# RABBITMQ_URL may name several nodes of one cluster: full URLs separated by this (a comma in a password is %2C).
NODE_URL_SEPARATOR = ","
# A message that keeps failing is retried after each of these delays, then dead-lettered.
RETRY_DELAYS_SECONDS = (1, 5, 30)
# What connecting to the broker, or using a connection, raises when the broker is away. pika raises its connector's
# own errors (a broker that takes the TCP connection and never answers the handshake times out with one of them),
# which are no AMQPError.
BROKER_AWAY = (AMQPError, AMQPConnectorException, OSError)
# The broker's refusals no reconnect mends: access refused (403), a vhost that does not exist (530), and a queue
# declared otherwise than Callflow declares it (a 406 saying so: a 406 also answers a passing fault, such as an
# unknown delivery tag after a reconnect).
_LASTING_REPLY_CODES = frozenset({403, 530})
_INEQUIVALENT_DECLARATION = "inequivalent arg"


def broker_refuses(exc: BaseException) -> bool:
    """Whether the broker refused Callflow for a reason that lasts until someone fixes it (its credentials, its
    permissions, its vhost, or the topology), rather than being away for a while."""
    if isinstance(exc, ProbableAuthenticationError | ProbableAccessDeniedError):
        return True
    if not isinstance(exc, ConnectionClosedByBroker | ChannelClosedByBroker):
        return False
    return exc.reply_code in _LASTING_REPLY_CODES or (
        exc.reply_code == 406 and _INEQUIVALENT_DECLARATION in str(exc.reply_text)
    )


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


def connection_parameters(
    url: str,
    *,
    timeout: float | None = None,
    blocked_timeout: float = 10,
    heartbeat: int = HEARTBEAT_SECONDS,
) -> list[pika.URLParameters]:
    """One entry per node `url` names, in random order, for `pika.BlockingConnection`, which tries them in turn: a
    connection goes to the first live node, and replicas spread their connections over the cluster. `timeout`, when
    given, bounds each socket operation and the whole opening of a connection, per node (else 5 s and pika's 15 s);
    `blocked_timeout`: how long a connection the broker blocked (out of memory or disk) may hold a publish.

    Raises ValueError for an entry that is not an amqp:// or amqps:// URL pika can read (naming its position, not
    the URL, which holds a password)."""
    nodes = [node.strip() for node in url.split(NODE_URL_SEPARATOR)]
    parameters = []
    for position, node in enumerate(nodes, start=1):
        where = f"node {position} of {len(nodes)}" if len(nodes) > 1 else "it"
        if not node.startswith(("amqp://", "amqps://")):
            raise ValueError(
                f"{where} is not an amqp:// or amqps:// URL (several nodes are full URLs separated by commas)"
            )
        try:
            params = pika.URLParameters(node)
        except ValueError as exc:
            raise ValueError(f"{where} is malformed: {exc}") from None
        params.heartbeat = heartbeat
        params.blocked_connection_timeout = blocked_timeout
        params.socket_timeout = 5 if timeout is None else timeout
        if timeout is not None:
            params.stack_timeout = timeout
        params.connection_attempts = 1
        parameters.append(params)
    random.shuffle(parameters)
    return parameters


@dataclass(frozen=True)
class Exchange:
    name: str
    type: Literal["topic", "fanout", "direct"]


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Binding:
    queue: str
    exchange: str
    routing_key: str


@dataclass(frozen=True)
class Policy:
    """A policy on the queues `pattern` matches. No client can set one over AMQP: a broker gets it from the
    definitions it loads (`shared.messaging.definitions`)."""

    name: str
    pattern: str
    definition: dict[str, Any]


@dataclass(frozen=True)
class Topology:
    """Exchanges, queues and bindings as data (all durable), so the services declare and
    `shared.messaging.definitions` exports the same thing; and the policies the exported document adds."""

    exchanges: tuple[Exchange, ...] = ()
    queues: tuple[Queue, ...] = ()
    bindings: tuple[Binding, ...] = ()
    policies: tuple[Policy, ...] = ()

    def __add__(self, other: Topology) -> Topology:
        return Topology(
            self.exchanges + other.exchanges,
            self.queues + other.queues,
            self.bindings + other.bindings,
            self.policies + other.policies,
        )


def retry_queue(queue: str, delay_seconds: int) -> str:
    return f"{queue}.retry-in-{delay_seconds}s"


def former_retry_queue(queue: str, delay_seconds: int) -> str:
    """The name of a delay queue from when they were classic queues, which a cluster loses with their node."""
    return f"{queue}.retry.{delay_seconds}s"


def retry_topology(queue: str) -> Topology:
    """Delay queues for `queue`: a message waits out its TTL there, then returns to `queue` by dead-lettering."""
    delay_queues = tuple(
        Queue(
            retry_queue(queue, delay),
            {
                # Replicated like the queue it feeds (a classic queue lives on one node: with that node down, no
                # process could declare the topology), and a message leaves it only once `queue` has taken it.
                "x-queue-type": "quorum",
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
                "x-message-ttl": delay * 1000,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": queue,
            },
        )
        for delay in RETRY_DELAYS_SECONDS
    )
    return Topology(
        exchanges=(Exchange(RETRY_EXCHANGE, "direct"),),
        queues=delay_queues,
        bindings=tuple(Binding(delay.name, RETRY_EXCHANGE, routing_key=delay.name) for delay in delay_queues),
    )


# What every service declares at start, and what deploy/rabbitmq/definitions.json is generated from.
TOPOLOGY = Topology(
    exchanges=(Exchange(EVENTS_EXCHANGE, "topic"), Exchange(DEAD_LETTER_EXCHANGE, "fanout")),
    queues=(
        # Listing dead letters returns each to the queue; RabbitMQ 4.x drops a quorum queue's message returned 20
        # times unless its limit says otherwise (3.10 reads -1 as "drop on first return").
        Queue(DEAD_LETTER_QUEUE, {"x-queue-type": "quorum", "x-delivery-limit": 2**31 - 1}),
        Queue(DISPATCH_QUEUE, {"x-queue-type": "quorum", "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}),
    ),
    bindings=(
        # A fanout exchange ignores the key: the queue's name, the key a binding gets when none is given.
        Binding(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, routing_key=DEAD_LETTER_QUEUE),
        *(Binding(DISPATCH_QUEUE, EVENTS_EXCHANGE, routing_key=message_type) for message_type in DISPATCH_BINDINGS),
    ),
    # The consumer dead-letters a message given back DISPATCH_DELIVERY_LIMIT times, with its reason; past that, the
    # broker dead-letters one the consumer never gets to read (pika cannot decode its headers). A policy, not a
    # queue argument: the arguments of a queue that exists already cannot change.
    policies=(
        Policy(
            "callflow-dispatch-delivery-limit",
            f"^{re.escape(DISPATCH_QUEUE)}$",
            {"delivery-limit": DISPATCH_DELIVERY_LIMIT},
        ),
    ),
) + retry_topology(DISPATCH_QUEUE)


def declare(channel: BlockingChannel, topology: Topology) -> None:
    """Idempotent; exchanges and queues first, since a binding needs both of its ends."""
    for exchange in topology.exchanges:
        channel.exchange_declare(exchange.name, exchange.type, durable=True)
    for queue in topology.queues:
        channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
    for binding in topology.bindings:
        channel.queue_bind(binding.queue, binding.exchange, routing_key=binding.routing_key)


def declare_topology(channel: BlockingChannel) -> None:
    """Idempotent: every service calls it at start, so it runs against an empty vhost."""
    declare(channel, TOPOLOGY)


def declare_retry_queues(channel: BlockingChannel, queue: str) -> None:
    declare(channel, retry_topology(queue))


def delete_former_retry_queues(url: str) -> list[str]:
    """Deletes the former classic delay queues once empty (nothing routes to them any more: what waits in one goes
    back to its queue within its delay); returns those still holding messages, to delete on a later run."""
    still_waiting = []
    connection = pika.BlockingConnection(connection_parameters(url))
    try:
        for delay in RETRY_DELAYS_SECONDS:
            name = former_retry_queue(DISPATCH_QUEUE, delay)
            channel = connection.channel()
            try:
                channel.queue_delete(name, if_empty=True)
            except ChannelClosedByBroker as exc:
                if exc.reply_code != pika.spec.PRECONDITION_FAILED:  # 406 is "not empty yet"; anything else is not
                    raise
                still_waiting.append(name)
            else:
                channel.close()
    finally:
        connection.close()
    return still_waiting


@contextmanager
def open_channel(url: str, confirmed: bool = True) -> Iterator[BlockingChannel]:
    """A channel on a fresh connection, the topology declared; closing it returns unacked messages. `confirmed`:
    each publish waits for the broker's confirm."""
    connection = pika.BlockingConnection(connection_parameters(url))
    try:
        channel = connection.channel()
        if confirmed:
            channel.confirm_delivery()
        declare_topology(channel)
        yield channel
    finally:
        connection.close()


def declare_topology_at(url: str) -> None:
    with open_channel(url):
        pass


def persistent_copy(properties: pika.BasicProperties, headers: dict[str, Any]) -> pika.BasicProperties:
    """The message's properties with other headers, for sending it on (to a retry, the dead letters, back). A copy
    whose properties would not fit well within one frame (the broker closes a connection that sends a larger one,
    and the message would come back to fail the same way) keeps only Callflow's own headers, saying so. A copy is a
    new message: the count of times the broker gave back the original is not carried over."""
    headers = {name: value for name, value in headers.items() if name != DELIVERY_COUNT_HEADER}
    copy = _copy(properties, headers)
    size = sum(len(part) for part in copy.encode())
    if size <= COPY_PROPERTIES_MAX_BYTES:
        return copy
    kept = {name: value for name, value in headers.items() if name.startswith(CALLFLOW_HEADER_PREFIX)}
    kept[HEADERS_DROPPED_HEADER] = f"the copy's properties came to {size} bytes: only Callflow's headers are kept"
    return _copy(properties, kept)


def _copy(properties: pika.BasicProperties, headers: dict[str, Any]) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=properties.content_type,
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=properties.message_id,
        type=properties.type,
        headers=headers,
    )


def ping(url: str) -> None:
    """Raises unless some node answers. Each node gets a short timeout: a node that drops packets must not make a
    readiness probe (itself timed out after a few seconds) fail while the others answer."""
    pika.BlockingConnection(connection_parameters(url, timeout=PING_TIMEOUT_SECONDS)).close()
