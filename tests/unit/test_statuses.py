import re

import pytest

from shared.calls import statuses
from shared.core.models import LIVE_CALL_CONDITION


def test_statuses_only_move_forward():
    assert statuses.moves_forward("pending", "queued")
    assert statuses.moves_forward("ringing", "completed")
    assert not statuses.moves_forward("completed", "ringing")
    assert not statuses.moves_forward("ringing", "ringing")


def test_terminal_statuses_never_replace_each_other():
    assert not statuses.moves_forward("completed", "failed")
    assert not statuses.moves_forward("busy", "completed")


def test_unknown_status_never_applies():
    assert not statuses.moves_forward("queued", "teleported")


@pytest.mark.parametrize(
    "status",
    ["completed", "busy", "no-answer", "failed", "canceled", "stopped", "error", "balance-low", "call-disconnected"],
)
def test_slot_is_released_at_disconnect_or_any_terminal_status(status):
    assert status in statuses.RELEASES_SLOT


def test_in_flight_statuses_keep_the_slot():
    assert not statuses.RELEASES_SLOT & {"queued", "initiated", "ringing", "in-progress", "pending", "initiating"}


def test_the_live_call_index_predicate_names_exactly_the_statuses_that_are_not_live():
    """The reconcile job's partial index is written in SQL; it must follow the terminal statuses defined here."""
    named = set(re.findall(r"'([a-z-]+)'", LIVE_CALL_CONDITION))
    assert named == statuses.TERMINAL | {statuses.PENDING}
