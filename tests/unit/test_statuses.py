import pytest

from shared.calls import statuses


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
