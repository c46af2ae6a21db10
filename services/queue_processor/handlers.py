"""What each message on the dispatch queue makes the queue-processor do."""

from __future__ import annotations

import logging
import uuid

from services.queue_processor.consumer import IncomingMessage, PoisonMessage
from services.queue_processor.dispatch import Dispatcher, DispatchTrigger
from shared.bolna.client import BolnaClient, BolnaError
from shared.messaging.topology import MessageType

log = logging.getLogger(__name__)


class DispatchQueueHandler:
    def __init__(self, dispatcher: Dispatcher, bolna: BolnaClient):
        self._dispatcher = dispatcher
        self._bolna = bolna

    def __call__(self, message: IncomingMessage) -> None:
        body = message.json()
        if message.message_type == MessageType.EXECUTION_STOP:
            self._stop_execution(body)
        elif message.message_type in (MessageType.SLOT_RELEASED, MessageType.ATTEMPT_ENDED):
            self._dispatcher.dispatch_pending(
                _user_id(body), DispatchTrigger.MESSAGE, _ended_call_id(body), received_at=message.received_at
            )
        elif message.message_type in (MessageType.CALL_QUEUED, MessageType.CAMPAIGN_STARTED):
            self._dispatcher.dispatch_pending(_user_id(body), DispatchTrigger.MESSAGE, received_at=message.received_at)
        else:
            raise PoisonMessage(f"unknown message type {message.message_type!r}")

    def _stop_execution(self, body: dict) -> None:
        execution_id = body.get("execution_id")
        if not isinstance(execution_id, str) or not execution_id:
            raise PoisonMessage("body has no execution_id")
        try:
            self._bolna.stop_execution(execution_id)
        except BolnaError as exc:
            if not exc.refused:
                raise  # retried after a delay, then dead-lettered and reported: the redial may still be dialling
            log.warning("Bolna would not stop execution %s (it may have ended): %s", execution_id, exc)


def _user_id(body: dict) -> uuid.UUID:
    try:
        return uuid.UUID(str(body["user_id"]))
    except (KeyError, ValueError) as exc:
        raise PoisonMessage("body has no valid user_id") from exc


def _ended_call_id(body: dict) -> uuid.UUID | None:
    """The call that freed the slot; a message without one (published before calls named it) still dispatches, and
    the scheduler settles its campaign attempt."""
    try:
        return uuid.UUID(str(body["call_id"]))
    except (KeyError, ValueError):
        return None
