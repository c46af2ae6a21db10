"""The one place where a call's state changes: slots taken and released, statuses moved, charges made.

Every function here changes a call its caller has locked (through the `CallStore`) and records the messages the
change announces on `call.messages`; the unit of work writes them to the outbox in the same transaction. A slot
is taken only under the user's row lock, so two transactions can never both take the last one.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timedelta

from sqlalchemy.exc import DBAPIError

from shared.bolna.execution import AgentExecution
from shared.calls import statuses
from shared.calls.store import CallStore
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import Call, Message, User, WebhookEvent
from shared.messaging.topology import MessageType

log = logging.getLogger(__name__)


def reserve_slot(store: CallStore, locked_user: User, call: Call, *, behind_queue: bool) -> bool:
    """Takes a slot for `call` if one is free; the caller holds the lock on `locked_user`.

    With `behind_queue`, calls already waiting go first: a new call does not jump the queue.
    """
    if behind_queue:
        held, queue_ahead = store.slots_and_queue(locked_user.id, call)
    else:
        held, queue_ahead = store.held_slots(locked_user.id), False
    if _free(locked_user, held) == 0 or queue_ahead:
        return False
    _take_slot(store, call)
    return True


def free_slots(store: CallStore, locked_user: User) -> int:
    """The user's slots not held now; the caller holds the lock on `locked_user`, so no other process takes one."""
    return _free(locked_user, store.held_slots(locked_user.id))


def _free(locked_user: User, held: int) -> int:
    return max(0, locked_user.max_concurrent_calls - held)


def reserve_slots(store: CallStore, free: int, calls: list[Call]) -> list[Call]:
    """Takes slots for as many of `calls` (queued, oldest first) as are `free` (counted by `free_slots` under the
    lock the caller still holds). Returns the calls that got one."""
    taken = calls[: max(0, free)]
    for call in taken:
        _take_slot(store, call)
    return taken


def _take_slot(store: CallStore, call: Call) -> None:
    """The slot's lease is short until Bolna names the execution, so a reservation that never reached Bolna comes
    back soon."""
    call.slot_held = True
    call.status = statuses.INITIATING
    call.initiated_at = call.provider_checked_at = store.now()
    call.slot_lease_expires_at = store.seconds_from_now(store.leases.initiating_seconds)


def hold_slot(store: CallStore, call: Call) -> None:
    """Bolna is calling for a call Callflow had given up on: it counts against the limit again, whatever the
    limit says (the call is a fact at Bolna)."""
    call.slot_held = True
    call.slot_lease_expires_at = store.seconds_from_now(store.leases.held_seconds)


def queue(call: Call) -> None:
    """The call waits for a slot: the dispatcher of its user is woken."""
    call.messages.append(_message(MessageType.CALL_QUEUED, call))


def _message(message_type: MessageType, call: Call) -> Message:
    """What the dispatcher of the call's user is told, naming the call."""
    return Message(message_type, {"user_id": str(call.user_id), "call_id": str(call.id)})


def release_slot(call: Call) -> None:
    """Gives the call's slot back and wakes the dispatcher; a slot already given back changes nothing."""
    if not call.slot_held:
        return
    call.slot_held = False
    call.slot_lease_expires_at = None
    call.messages.append(_message(MessageType.SLOT_RELEASED, call))


def fail(call: Call, error_type: str, detail: str) -> None:
    """Releases the call's slot and fails it, unless it already ended."""
    slot_was_held = call.slot_held
    release_slot(call)
    if statuses.is_terminal(call.status):
        return
    call.status = statuses.FAILED
    call.error_type = error_type
    call.error_detail = detail[:2000]
    if not slot_was_held:
        _announce_attempt_end(call)


def _announce_attempt_end(call: Call) -> None:
    """A campaign call reached its final status with its slot already given back (Bolna's `completed` comes after
    `call-disconnected` freed the line), so no `slot.released` names it: its contact is settled on this message
    rather than on the scheduler's next round."""
    if call.contact_id is not None and statuses.is_terminal(call.status):
        call.messages.append(_message(MessageType.ATTEMPT_ENDED, call))


def requeue(store: CallStore, call: Call, delay_seconds: float, detail: str) -> None:
    """Puts the call back in the queue, due again after `delay_seconds`."""
    release_slot(call)
    call.status = statuses.PENDING
    call.next_attempt_at = store.seconds_from_now(delay_seconds)
    call.error_detail = detail[:2000]


def cancel_queued(call: Call, detail: str) -> None:
    """A call still waiting in the queue (it never reached Bolna) will not be placed."""
    if call.status == statuses.PENDING:
        call.status = statuses.CANCELED
        call.error_detail = detail[:2000]


def await_provider(call: Call, detail: str) -> None:
    """Bolna may have the call (its answer was lost): it keeps its slot and its status, with the reason on record,
    until Bolna's word, or the reconcile job, settles it."""
    if call.status == statuses.INITIATING and call.execution_id is None:
        call.error_detail = detail[:2000]


def count_dispatch_attempt(call: Call, max_attempts: int) -> bool:
    """Counts one more provider attempt that reached Bolna; False once the call has used up its attempts."""
    if call.dispatch_attempts + 1 >= max_attempts:
        return False
    call.dispatch_attempts += 1
    return True


def link_execution(store: CallStore, call: Call, execution_id: str, status: str | None = None) -> None:
    """Bolna has the call under `execution_id` (its answer to POST /call, a webhook naming our call id, or a search
    of the agent's executions): its slot gets the full lease. `status` (its answer's) moves the call only to a status
    that holds the line: the line's end comes as a status event (`apply_provider_event`), which frees the slot and
    bills; taken from the answer, it would end the call with its slot held."""
    call.execution_id = execution_id
    heard_from_provider(store, call)
    if call.slot_held:
        call.slot_lease_expires_at = store.seconds_from_now(store.leases.held_seconds)
    if status is not None and status not in statuses.RELEASES_SLOT and statuses.moves_forward(call.status, status):
        call.status = status


def heard_from_provider(store: CallStore, call: Call) -> None:
    """Bolna said something about the call (or was asked): the reconcile job leaves it alone for a while."""
    call.provider_checked_at = store.now()


def extend_lease(store: CallStore, call: Call, now: datetime, max_leases: int) -> bool:
    """Gives a call Bolna still reports as live another lease, up to `max_leases` since it was placed."""
    lease = timedelta(seconds=store.leases.held_seconds)
    if not call.slot_held or (call.initiated_at or call.created_at) < now - max_leases * lease:
        return False
    call.slot_lease_expires_at = store.seconds_from_now(store.leases.held_seconds)
    return True


def apply_provider_event(store: CallStore, call: Call, event: WebhookEvent) -> None:
    """Applies one of Bolna's status events (of a status it knows: `statuses.PROVIDER_STATUSES`) to its call:
    statuses only move forward, the line's end frees the slot, and `completed` charges the call once."""
    event.call_id = call.id
    event.applied_at = store.now()
    heard_from_provider(store, call)
    if is_redial(event):
        # Bolna redials on its own (an agent with auto-retry on), whatever order its statuses arrive in: a redial
        # is never applied, and one still under way is stopped, so every dial goes through the limit.
        if redial_is_stopped(event.status):
            log.warning(
                "Bolna redials call %s (attempt %d, %s): asking it to stop", call.id, event.attempt, event.status
            )
            stop = {"execution_id": event.execution_id, "call_id": str(call.id)}
            call.messages.append(Message(MessageType.EXECUTION_STOP, stop))
        return
    overruled = _provider_overrules_callflow_failure(call, event)
    if not (overruled or statuses.moves_forward(call.status, event.status)):
        return  # a duplicate or a late event: statuses never move backwards
    slot_was_held = call.slot_held
    execution = AgentExecution(event.payload)
    if overruled:
        call.error_type = call.error_detail = None
        if event.status not in statuses.RELEASES_SLOT:
            hold_slot(store, call)
    call.status = event.status
    call.transcript = execution.transcript or call.transcript
    call.recording_url = execution.recording_url or call.recording_url
    if event.status in statuses.RELEASES_SLOT:
        release_slot(call)
    if not slot_was_held:
        _announce_attempt_end(call)
    if event.status == statuses.COMPLETED:
        bill(store, call, execution.duration_seconds)
    if overruled and call.contact_id is not None:
        # After the charge: it takes the customer's lock, which comes before the campaign's, as everywhere else.
        store.reopen_campaign_attempt(call)


def is_redial(event: WebhookEvent) -> bool:
    """Whether the event is a status of a redial: Bolna dialling the call again on its own (its retry count)."""
    return event.attempt > 0 and event.status in statuses.PROVIDER_STATUSES


def redial_is_stopped(status: str) -> bool:
    """Whether a status of a redial (Bolna dialling again on its own) has Callflow ask Bolna to stop it: one still
    under way; one that ended has nothing left to stop."""
    return not statuses.is_terminal(status)


def _provider_overrules_callflow_failure(call: Call, event: WebhookEvent) -> bool:
    """Callflow failed the call only because it heard nothing; Bolna's word on it is the truth.

    A call given up as `bolna_outcome_unknown` was never confirmed: any status from Bolna means it is under way (it
    holds its slot again) or over, its own `failed` included (the failure is then Bolna's, which a campaign's retry
    policy follows, and a stale `ringing` after it overrules nothing). A lease expires only after Bolna was asked:
    only its final word overrules that, other than its failure, so a stale `ringing` cannot take the slot back.
    """
    if call.status != statuses.FAILED:
        return False
    if call.error_type == ErrorType.BOLNA_OUTCOME_UNKNOWN:
        return True
    return (
        call.error_type == ErrorType.SLOT_LEASE_EXPIRED
        and event.status in statuses.TERMINAL
        and event.status != statuses.FAILED
    )


def bill(store: CallStore, call: Call, seconds: int | None) -> None:
    """Charges a completed call for its duration; one without a usable duration is marked, never billed 0."""
    if not seconds:
        call.error_type = ErrorType.BILLING_DURATION_MISSING
        call.error_detail = "Bolna reported the call completed without a usable duration; it was not charged."
        return
    charge(store, call, seconds)


def charge(store: CallStore, call: Call, seconds: int) -> None:
    """Charges ceil(duration / 60) credits, once: the ledger's unique (call, reason) makes it a fact."""
    credits = math.ceil(seconds / 60)
    try:
        charged = store.add_charge(call, credits)
    except DBAPIError as exc:  # the whole transaction rolls back: the completion waits until it can be billed
        raise CallflowError(
            ErrorType.CREDIT_DEDUCTION_FAILED,
            f"Charging {credits} credits for a completed call failed: {type(exc).__name__}",
            sentry_contexts={"credit_details": {"credits": credits, "duration_seconds": seconds}},
            call_id=call.id,
            user_id=call.user_id,
            agent_id=call.agent_id,
            execution_id=call.execution_id,
        ) from exc
    if charged:
        call.duration_seconds = seconds
        call.credits_charged = credits
