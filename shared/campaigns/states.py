"""A campaign's statuses and the moves a customer may ask for; a contact's states.

draft --start--> scheduled (startAt ahead) --its time--> running --every contact final--> completed
                 running <--pause/resume--> paused          (out of credits: paused, reason insufficient_credits)
draft, scheduled, running, paused --cancel--> canceled
"""

from __future__ import annotations

from enum import StrEnum

DRAFT = "draft"
SCHEDULED = "scheduled"
RUNNING = "running"
PAUSED = "paused"
COMPLETED = "completed"
CANCELED = "canceled"

ACTIVE = (SCHEDULED, RUNNING)  # the campaigns the dispatcher looks at (ix_campaigns_active)
FINISHED = frozenset({COMPLETED, CANCELED})

# A contact waits (its turn, its retry's interval, its calling window), is being called, or has its final result.
WAITING = "waiting"
CALLING = "calling"
DONE = "done"

PAUSED_NO_CREDITS = "insufficient_credits"


class Action(StrEnum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"


ALLOWED_FROM: dict[Action, frozenset[str]] = {
    Action.START: frozenset({DRAFT}),
    Action.PAUSE: frozenset({SCHEDULED, RUNNING}),
    Action.RESUME: frozenset({PAUSED}),
    Action.CANCEL: frozenset({DRAFT, SCHEDULED, RUNNING, PAUSED}),
}
