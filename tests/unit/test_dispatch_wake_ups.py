"""Which wake-ups the dispatcher may answer without reading again: those that arrived before the start of a read that
found nothing more to do for their customer."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from services.queue_processor.consumer import IncomingMessage
from services.queue_processor.dispatch import DispatchTrigger, ReadWatermarks
from services.queue_processor.handlers import DispatchQueueHandler
from shared.messaging.topology import DISPATCH_QUEUE, MessageType


class _RecordingDispatcher:
    def __init__(self) -> None:
        self.dispatches: list[tuple[Any, ...]] = []

    def dispatch_pending(self, user_id, trigger, ended_call_id=None, received_at=None) -> int:
        self.dispatches.append((user_id, trigger, ended_call_id, received_at))
        return 0


@pytest.mark.parametrize(
    ("message_type", "names_its_call", "ended_its_call"),
    [
        (MessageType.CALL_QUEUED, True, False),
        (MessageType.CAMPAIGN_STARTED, False, False),
        (MessageType.SLOT_RELEASED, True, True),
        (MessageType.SLOT_RELEASED, False, False),  # published before slot.released named its call
        (MessageType.ATTEMPT_ENDED, True, True),
    ],
)
def test_each_wake_up_tells_the_dispatcher_when_it_arrived(message_type, names_its_call, ended_its_call):
    dispatcher = _RecordingDispatcher()
    user_id, call_id = uuid.uuid4(), uuid.uuid4()
    body = {"user_id": str(user_id), "call_id": str(call_id)} if names_its_call else {"user_id": str(user_id)}
    message = IncomingMessage(
        message_id="m",
        message_type=message_type,
        body=json.dumps(body).encode(),
        headers={},
        queue=DISPATCH_QUEUE,
        redelivered=False,
        received_at=12.5,
    )
    DispatchQueueHandler(dispatcher, bolna=None)(message)
    ended = call_id if ended_its_call else None
    assert dispatcher.dispatches == [(user_id, DispatchTrigger.MESSAGE, ended, 12.5)]


def test_a_read_covers_what_arrived_before_it_began_and_nothing_after():
    watermarks = ReadWatermarks()
    user, other = uuid.uuid4(), uuid.uuid4()
    watermarks.record(user, 10.0)
    assert watermarks.covers(user, 9.9)
    assert not watermarks.covers(user, 10.0)
    assert not watermarks.covers(other, 9.9), "another customer's read says nothing of this one's calls"
    watermarks.record(user, 8.0)  # a dispatch on another thread that ended on an earlier read
    assert watermarks.covers(user, 9.9)


def test_a_customer_it_no_longer_remembers_is_read_again():
    watermarks = ReadWatermarks(users=2)
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    watermarks.record(first, 10.0)
    watermarks.record(second, 10.0)
    watermarks.record(first, 11.0)  # read again: the most recent
    watermarks.record(third, 10.0)
    assert not watermarks.covers(second, 1.0)
    assert watermarks.covers(first, 1.0) and watermarks.covers(third, 1.0)
