"""Call statuses: Callflow's own (before the provider has the call) and Bolna's, in the order a call moves.

A status only ever moves forward: an event whose rank is not above the call's current rank changes nothing.
"""

from __future__ import annotations

PENDING = "pending"  # waiting in Callflow's queue for a free slot
INITIATING = "initiating"  # slot reserved, the provider is being asked to place the call
FAILED = "failed"  # also one of Bolna's terminal statuses
COMPLETED = "completed"
CANCELED = "canceled"  # also a status of Bolna's; Callflow gives it to a queued call of a canceled campaign
CALL_DISCONNECTED = "call-disconnected"

TERMINAL = frozenset({COMPLETED, "busy", "no-answer", FAILED, CANCELED, "stopped", "error", "balance-low"})
# The line is free at the first of these: the call's slot goes back to the user.
RELEASES_SLOT = TERMINAL | {CALL_DISCONNECTED}

_TERMINAL_RANK = 6
_RANKS = {
    PENDING: 0,
    INITIATING: 0,
    "scheduled": 1,
    "queued": 1,
    "rescheduled": 1,
    "initiated": 2,
    "ringing": 3,
    "in-progress": 4,
    CALL_DISCONNECTED: 5,
    **{status: _TERMINAL_RANK for status in TERMINAL},
}
RANKED = frozenset(_RANKS)  # every status a call can have
PROVIDER_STATUSES = RANKED - {PENDING, INITIATING}


def rank(status: str) -> int:
    return _RANKS[status]


def moves_forward(current: str, new: str) -> bool:
    return new in _RANKS and rank(new) > rank(current)


def is_terminal(status: str) -> bool:
    return status in TERMINAL
