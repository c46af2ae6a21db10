"""Looking at what reached RabbitMQ, from a test."""

from __future__ import annotations

import os
import subprocess
import time

import pika

from shared.messaging.topology import EVENTS_EXCHANGE, open_channel


def channel():
    return open_channel(os.environ["RABBITMQ_URL"])


def tap(ch, routing_key: str) -> str:
    """An exclusive queue that receives a copy of every event published with `routing_key`."""
    queue = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(queue, EVENTS_EXCHANGE, routing_key=routing_key)
    return queue


def get_messages(ch, queue: str, expected: int, timeout: float = 10.0) -> list[tuple[pika.BasicProperties, bytes]]:
    found: list[tuple[pika.BasicProperties, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(found) < expected and time.monotonic() < deadline:
        method, properties, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        found.append((properties, body))
    return found


def stop_broker() -> None:
    """Stops RabbitMQ's application (the node stays up to be started again), as a broker outage would."""
    subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, capture_output=True, timeout=120)


def start_broker() -> None:
    subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, capture_output=True, timeout=120)
    subprocess.run(["rabbitmqctl", "-q", "await_startup", "--timeout", "120"], check=True, capture_output=True)
