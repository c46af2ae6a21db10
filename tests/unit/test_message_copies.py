"""A copy of a message sent on (a retry, a dead letter, a replay) is a new message."""

from __future__ import annotations

import pika

from shared.messaging.topology import DELIVERY_COUNT_HEADER, persistent_copy


def test_a_copy_does_not_carry_how_often_the_broker_gave_the_original_back():
    original = pika.BasicProperties(message_id="m", type="slot.released", headers={DELIVERY_COUNT_HEADER: 25})
    copy = persistent_copy(original, {**original.headers, "x-callflow-attempt": 1})
    assert copy.headers == {"x-callflow-attempt": 1}, "replayed, it would be dead-lettered again before handling"
    assert (copy.message_id, copy.type, copy.delivery_mode) == (
        "m",
        "slot.released",
        pika.DeliveryMode.Persistent.value,
    )
