"""The dead-letter queue, for operators: what is in it and why, and sending messages back to be processed.

Listing takes each letter and returns it to the queue, and RabbitMQ 4.x drops a quorum queue's message once it has
been returned 20 times (its default delivery limit): dead letters are kept in a queue declared with a limit no
listing reaches. The queue they were kept in before had none; `adopt_former_dead_letters` moves its letters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pika
from pika.exceptions import ChannelClosedByBroker

from shared.messaging.topology import (
    ATTEMPT_HEADER,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_REASON_HEADER,
    ORIGINAL_QUEUE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    OUTAGE_WAITS_HEADER,
    open_channel,
    persistent_copy,
)

# Where dead letters were kept before: a quorum queue without a delivery limit, bound to the dead-letter exchange.
FORMER_DEAD_LETTER_QUEUE = "callflow.dead-letter"

_DEAD_LETTER_HEADERS = (
    DEAD_LETTER_REASON_HEADER,
    ORIGINAL_QUEUE_HEADER,
    ATTEMPT_HEADER,
    OUTAGE_WAITS_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
)


@dataclass(frozen=True)
class DeadLetter:
    message_id: str | None
    message_type: str | None
    reason: str
    original_queue: str | None
    body: bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "type": self.message_type,
            "reason": self.reason,
            "original_queue": self.original_queue,
            "body": self.body.decode(errors="replace")[:500],
        }


def _dead_letter(properties: pika.BasicProperties, body: bytes) -> DeadLetter:
    headers = properties.headers or {}
    return DeadLetter(
        properties.message_id,
        properties.type,
        str(headers.get(DEAD_LETTER_REASON_HEADER, "")),
        headers.get(ORIGINAL_QUEUE_HEADER),
        body,
    )


def list_dead_letters(url: str, limit: int = 100) -> list[DeadLetter]:
    """Reads up to `limit` dead letters without removing them: closing the channel returns them to the queue, in
    their places, as often as they are listed."""
    found: list[DeadLetter] = []
    with open_channel(url) as channel:
        while len(found) < limit:
            method, properties, body = channel.basic_get(DEAD_LETTER_QUEUE, auto_ack=False)
            if method is None:
                break
            found.append(_dead_letter(properties, body))
    return found


def replay(url: str, message_ids: set[str] | None = None, limit: int = 1000) -> list[DeadLetter]:
    """Sends dead letters (those named, or all) back to the queue they failed in, with a fresh retry budget.

    Each is removed from the dead-letter queue only once the broker has confirmed the copy sent back.
    """
    replayed: list[DeadLetter] = []
    with open_channel(url) as channel:
        for _ in range(limit):
            method, properties, body = channel.basic_get(DEAD_LETTER_QUEUE, auto_ack=False)
            if method is None:
                break
            letter = _dead_letter(properties, body)
            if not letter.original_queue or (message_ids is not None and letter.message_id not in message_ids):
                continue
            headers = {k: v for k, v in (properties.headers or {}).items() if k not in _DEAD_LETTER_HEADERS}
            fresh = persistent_copy(properties, headers)
            channel.basic_publish("", letter.original_queue, body, fresh, mandatory=True)
            channel.basic_ack(method.delivery_tag)
            replayed.append(letter)
    return replayed


def adopt_former_dead_letters(url: str) -> int | None:
    """Moves the letters of the queue dead letters were kept in before into the dead-letter queue, then deletes it;
    how many were moved, or None if there is no such queue.

    It is unbound first, so no letter arrives while it is emptied; each letter leaves it only once the broker has
    confirmed the copy. A letter being listed meanwhile (not in the queue) would be lost: run it when nobody lists
    dead letters (quorum queues cannot be deleted only if empty)."""
    with open_channel(url) as channel:
        probe = channel.connection.channel()  # the broker closes the channel that asks for a missing queue
        try:
            probe.queue_declare(FORMER_DEAD_LETTER_QUEUE, passive=True)
        except ChannelClosedByBroker as exc:
            if exc.reply_code == pika.spec.NOT_FOUND:
                return None
            raise
        probe.close()
        channel.queue_unbind(FORMER_DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE)
        moved = 0
        while True:
            method, properties, body = channel.basic_get(FORMER_DEAD_LETTER_QUEUE, auto_ack=False)
            if method is None:
                break
            channel.basic_publish("", DEAD_LETTER_QUEUE, body, properties, mandatory=True)
            channel.basic_ack(method.delivery_tag)
            moved += 1
        channel.queue_delete(FORMER_DEAD_LETTER_QUEUE)
    return moved
