"""The dead-letter queue, for operators: what is in it and why, and sending messages back to be processed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pika

from shared.messaging.topology import (
    ATTEMPT_HEADER,
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_REASON_HEADER,
    ORIGINAL_QUEUE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    open_channel,
    persistent_copy,
)

_DEAD_LETTER_HEADERS = (
    DEAD_LETTER_REASON_HEADER,
    ORIGINAL_QUEUE_HEADER,
    ATTEMPT_HEADER,
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
    """Reads up to `limit` dead letters without removing them."""
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
