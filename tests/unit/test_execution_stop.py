"""Asking Bolna to stop a call it redialled on its own: what Bolna's refusal means for the message."""

from __future__ import annotations

import json
import uuid

import pytest

from services.queue_processor.consumer import IncomingMessage
from services.queue_processor.handlers import DispatchQueueHandler
from shared.bolna.client import BolnaError
from shared.messaging.topology import DISPATCH_QUEUE, MessageType


class _BolnaAnsweringStop:
    """Bolna's answer to POST /call/{id}/stop: a refusal with `status_code`."""

    def __init__(self, status_code: int):
        self.status_code = status_code

    def stop_execution(self, execution_id: str) -> None:
        raise BolnaError(f"/call/{execution_id}/stop", "no", self.status_code)


@pytest.mark.parametrize(
    ("status_code", "retried"),
    [(404, False), (400, False), (401, True), (403, True), (200, True), (503, True)],
    ids=["not known", "ended", "key refused", "key not valid", "an answer that cannot be read", "Bolna down"],
)
def test_a_redials_stop_bolna_did_not_refuse_for_the_execution_is_retried_then_dead_lettered(status_code, retried):
    message = IncomingMessage(
        message_id="m",
        message_type=MessageType.EXECUTION_STOP,
        body=json.dumps({"execution_id": "e", "call_id": str(uuid.uuid4())}).encode(),
        headers={},
        queue=DISPATCH_QUEUE,
        redelivered=False,
    )
    handler = DispatchQueueHandler(None, bolna=_BolnaAnsweringStop(status_code))  # type: ignore[arg-type]
    if retried:  # the consumer retries it after a delay, then dead-letters and reports it
        with pytest.raises(BolnaError):
            handler(message)
    else:
        handler(message)  # the execution ended, or Bolna does not know it: nothing is left to stop
