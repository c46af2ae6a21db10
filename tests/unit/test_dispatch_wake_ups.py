"""Which wake-ups the dispatcher may answer without reading again: those that arrived before a read it finished on."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from services.queue_processor.consumer import IncomingMessage
from services.queue_processor.dispatch import DispatchTrigger, ReadsThrough
from services.queue_processor.handlers import DispatchQueueHandler
from shared.messaging.topology import DISPATCH_QUEUE, MessageType


class _RecordingDispatcher:
    def __init__(self) -> None:
        self.dispatches: list[tuple[Any, ...]] = []

    def dispatch_pending(self, user_id, trigger, ended_call_id=None, received_at=None) -> int:
        self.dispatches.append((user_id, trigger, ended_call_id, received_at))
        return 0


@pytest.mark.parametrize(
    "message_type", [MessageType.CALL_QUEUED, MessageType.CAMPAIGN_STARTED, MessageType.SLOT_RELEASED]
)
def test_each_wake_up_tells_the_dispatcher_when_it_arrived(message_type):
    dispatcher = _RecordingDispatcher()
    user_id, call_id = uuid.uuid4(), uuid.uuid4()
    message = IncomingMessage(
        message_id="m",
        message_type=message_type,
        body=json.dumps({"user_id": str(user_id), "call_id": str(call_id)}).encode(),
        headers={},
        queue=DISPATCH_QUEUE,
        redelivered=False,
        received_at=12.5,
    )
    DispatchQueueHandler(dispatcher, bolna=None)(message)
    ended = call_id if message_type == MessageType.SLOT_RELEASED else None
    assert dispatcher.dispatches == [(user_id, DispatchTrigger.MESSAGE, ended, 12.5)]


def test_a_read_covers_what_arrived_before_it_began_and_nothing_after():
    reads = ReadsThrough()
    user, other = uuid.uuid4(), uuid.uuid4()
    reads.record(user, 10.0)
    assert reads.covers(user, 9.9)
    assert not reads.covers(user, 10.0)
    assert not reads.covers(other, 9.9), "another customer's read says nothing of this one's calls"
    reads.record(user, 8.0)  # a dispatch on another thread that ended on an earlier read
    assert reads.covers(user, 9.9)


def test_a_customer_it_no_longer_remembers_is_read_again():
    reads = ReadsThrough(users=2)
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    reads.record(first, 10.0)
    reads.record(second, 10.0)
    reads.record(first, 11.0)  # read again: the most recent
    reads.record(third, 10.0)
    assert not reads.covers(second, 1.0)
    assert reads.covers(first, 1.0) and reads.covers(third, 1.0)
