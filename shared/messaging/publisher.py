"""Publishing with confirms and persistent messages.

pika connections are not thread-safe, so each thread gets its own, opened on first use (after any fork).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPError

from shared.messaging.topology import EVENTS_EXCHANGE, HEARTBEAT_SECONDS, connection_parameters, declare_topology

log = logging.getLogger(__name__)


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
