"""Call placers for in-process tests: the real one's reservations, without asking Bolna."""

from __future__ import annotations

from shared.calls.initiation import CallPlacer
from shared.core.models import Call
from tests.support.components import components


class RecordingPlacer(CallPlacer):
    """Bolna is never asked: each call handed over keeps its slot, as if Bolna were dialling it."""

    def __init__(self) -> None:
        super().__init__(components().uow, components().bolna, max_attempts=3)
        self.placed: list[Call] = []

    def initiate(self, call: Call, provider_agent_id: str, retry_transient: bool) -> Call | None:
        self.placed.append(call)
        return None
