"""The call lifecycle's rules, on an in-memory store: slots taken and released, statuses only forward, one charge."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from shared.calls import lifecycle, statuses
from shared.calls.store import SlotLeases
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import Call, Message, WebhookEvent
from shared.messaging.topology import MessageType
from tests.unit.fakes import FakeCallStore

LEASE = 3600
SHORT_LEASE = 30


@pytest.fixture
def store() -> FakeCallStore:
    return FakeCallStore(SlotLeases(initiating_seconds=SHORT_LEASE, held_seconds=LEASE))


def _event(call: Call, status: str, attempt: int = 0, **payload: object) -> WebhookEvent:
    execution_id = call.execution_id or str(uuid.uuid4())
    body = {"id": execution_id, "status": status, **payload}
    return WebhookEvent(execution_id=execution_id, status=status, attempt=attempt, payload=body)


def _reserve(store: FakeCallStore, call: Call, behind_queue: bool = False) -> bool:
    user = store.lock_user(call.user_id)
    return lifecycle.reserve_slot(store, user, call, behind_queue=behind_queue)


def _live(store: FakeCallStore, status: str = "in-progress", **fields: object) -> Call:
    defaults: dict[str, object] = {"slot_held": True, "execution_id": str(uuid.uuid4())}
    return store.add_call(store.add_user(), status=status, **{**defaults, **fields})


def test_slots_are_taken_up_to_the_limit_and_never_beyond(store):
    user = store.add_user(max_concurrent_calls=2)
    calls = [store.add_call(user) for _ in range(3)]
    assert [_reserve(store, call) for call in calls] == [True, True, False]
    assert store.held_slots(user.id) == 2
    for call in calls[:2]:
        assert call.status == statuses.INITIATING
        assert call.slot_lease_expires_at == store.clock + timedelta(seconds=SHORT_LEASE)
    assert (calls[2].status, calls[2].slot_held) == (statuses.PENDING, False)


def test_a_new_call_does_not_jump_the_queue(store):
    user = store.add_user(max_concurrent_calls=1)
    waiting = store.add_call(user)
    newcomer = store.add_call(user)
    assert not _reserve(store, newcomer, behind_queue=True)
    assert _reserve(store, waiting, behind_queue=True)


def test_a_call_waiting_out_a_retry_delay_does_not_hold_newcomers_back(store):
    user = store.add_user(max_concurrent_calls=1)
    store.add_call(user, next_attempt_at=store.clock + timedelta(seconds=30))
    newcomer = store.add_call(user)
    assert _reserve(store, newcomer, behind_queue=True)


def test_a_released_slot_is_free_again_and_announced_once(store):
    call = _live(store)
    lifecycle.release_slot(call)
    lifecycle.release_slot(call)
    assert (call.slot_held, call.slot_lease_expires_at) == (False, None)
    released = {"user_id": str(call.user_id), "call_id": str(call.id)}  # the call: its campaign attempt is settled
    assert call.messages == [Message(MessageType.SLOT_RELEASED, released)]


def test_a_queued_call_wakes_its_dispatcher(store):
    call = store.add_call(store.add_user())
    lifecycle.queue(call)
    assert [m.message_type for m in call.messages] == [MessageType.CALL_QUEUED]
    assert call.messages[0].body == {"user_id": str(call.user_id), "call_id": str(call.id)}


def test_failing_a_call_releases_its_slot_but_never_rewrites_an_ended_call(store):
    live = _live(store)
    lifecycle.fail(live, ErrorType.BOLNA_API_FAILURE, "HTTP 500")
    assert (live.status, live.error_type, live.slot_held) == (statuses.FAILED, ErrorType.BOLNA_API_FAILURE, False)

    ended = _live(store, status=statuses.COMPLETED)
    lifecycle.fail(ended, ErrorType.SLOT_LEASE_EXPIRED, "late")
    assert (ended.status, ended.error_type, ended.slot_held) == (statuses.COMPLETED, None, False)


def test_a_requeued_call_gives_its_slot_back_and_waits_its_delay(store):
    call = _live(store, status=statuses.INITIATING)
    lifecycle.requeue(store, call, 8.0, "Bolna /call: HTTP 503")
    assert (call.status, call.slot_held) == (statuses.PENDING, False)
    assert call.next_attempt_at == store.clock + timedelta(seconds=8)
    assert [m.message_type for m in call.messages] == [MessageType.SLOT_RELEASED]


def test_dispatch_attempts_run_out(store):
    call = store.add_call(store.add_user())
    assert [lifecycle.count_dispatch_attempt(call, max_attempts=3) for _ in range(3)] == [True, True, False]
    assert call.dispatch_attempts == 2


@pytest.mark.parametrize(
    ("sequence", "final"),
    [
        (["ringing", "in-progress", "ringing", "queued"], "in-progress"),
        (["completed", "in-progress", "call-disconnected"], "completed"),
        (["busy", "completed", "failed"], "busy"),
    ],
)
def test_statuses_only_move_forward(store, sequence, final):
    call = _live(store, status="queued")
    for status in sequence:
        lifecycle.apply_provider_event(store, call, _event(call, status, telephony_data={"duration": "30"}))
    assert call.status == final


def test_the_line_ending_frees_the_slot_before_completed_arrives(store):
    call = _live(store)
    lifecycle.apply_provider_event(store, call, _event(call, statuses.CALL_DISCONNECTED))
    assert (call.status, call.slot_held) == (statuses.CALL_DISCONNECTED, False)
    assert store.ledger == {}


def test_completed_charges_once_however_often_it_arrives(store):
    call = _live(store)
    credits_before = store.users[call.user_id].credits
    completed = {"telephony_data": {"duration": "61", "recording_url": "https://rec.example/1"}, "transcript": "hi"}
    for _ in range(3):
        lifecycle.apply_provider_event(store, call, _event(call, statuses.COMPLETED, **completed))
    assert store.ledger == {call.id: -2}
    assert store.users[call.user_id].credits == credits_before - 2
    assert (call.credits_charged, call.duration_seconds) == (2, 61)
    assert (call.transcript, call.recording_url) == ("hi", "https://rec.example/1")


@pytest.mark.parametrize("duration", [None, 0, "0", 10**9, 10**400, "nan", "soon"])
def test_a_completed_call_without_a_usable_duration_is_marked_never_billed_zero(store, duration):
    call = _live(store)
    payload = {} if duration is None else {"conversation_duration": duration}
    lifecycle.apply_provider_event(store, call, _event(call, statuses.COMPLETED, **payload))
    assert store.ledger == {}
    assert (call.status, call.slot_held) == (statuses.COMPLETED, False)
    assert (call.error_type, call.credits_charged) == (ErrorType.BILLING_DURATION_MISSING, None)


def test_a_failed_charge_stops_the_completion_with_credit_deduction_failed(store):
    call = _live(store)
    store.ledger_down = True
    with pytest.raises(CallflowError) as raised:
        lifecycle.apply_provider_event(store, call, _event(call, statuses.COMPLETED, conversation_duration=90))
    assert raised.value.error_type is ErrorType.CREDIT_DEDUCTION_FAILED
    assert raised.value.tags["call_id"] == call.id
    assert call.credits_charged is None


def test_bolnas_final_word_overrules_an_expired_lease_and_bills(store):
    call = _live(store, status=statuses.FAILED, error_type=ErrorType.SLOT_LEASE_EXPIRED, error_detail="expired")
    call.slot_held = False
    lifecycle.apply_provider_event(store, call, _event(call, statuses.COMPLETED, conversation_duration=120))
    assert (call.status, call.error_type, call.error_detail) == (statuses.COMPLETED, None, None)
    assert store.ledger == {call.id: -2}


def test_a_campaign_call_ending_after_its_line_was_freed_announces_its_end_so_its_contact_is_settled(store):
    campaign_call = _live(store, contact_id=7)
    direct_call = _live(store)
    for call in (campaign_call, direct_call):
        lifecycle.apply_provider_event(store, call, _event(call, statuses.CALL_DISCONNECTED))
        lifecycle.apply_provider_event(store, call, _event(call, statuses.COMPLETED, conversation_duration=60))
    released = [m.message_type for m in direct_call.messages]
    assert released == [MessageType.SLOT_RELEASED], "a direct call's end needs no settling"
    assert [(m.message_type, m.body["call_id"]) for m in campaign_call.messages] == [
        (MessageType.SLOT_RELEASED, str(campaign_call.id)),
        (MessageType.ATTEMPT_ENDED, str(campaign_call.id)),
    ]


def test_a_campaign_call_failed_after_its_slot_was_freed_announces_its_end(store):
    call = _live(store, status=statuses.CALL_DISCONNECTED, slot_held=False, contact_id=7)
    lifecycle.fail(call, ErrorType.BOLNA_API_FAILURE, "gone")
    assert [m.message_type for m in call.messages] == [MessageType.ATTEMPT_ENDED]


def test_bolnas_word_on_a_campaign_call_callflow_failed_reopens_its_contacts_result(store):
    campaign_call = _live(store, status=statuses.FAILED, error_type=ErrorType.BOLNA_OUTCOME_UNKNOWN, contact_id=7)
    direct_call = _live(store, status=statuses.FAILED, error_type=ErrorType.BOLNA_OUTCOME_UNKNOWN)
    for call in (campaign_call, direct_call):
        lifecycle.apply_provider_event(store, call, _event(call, "no-answer"))
    assert store.reopened_attempts == [campaign_call.id], "settled again on Bolna's word, not on Callflow's failure"


def test_a_stale_live_status_does_not_overrule_an_expired_lease(store):
    call = _live(store, status=statuses.FAILED, error_type=ErrorType.SLOT_LEASE_EXPIRED)
    call.slot_held = False
    lifecycle.apply_provider_event(store, call, _event(call, "ringing"))
    assert (call.status, call.error_type, call.slot_held) == (statuses.FAILED, ErrorType.SLOT_LEASE_EXPIRED, False)


def test_a_provider_failure_does_not_overrule_an_expired_lease(store):
    call = _live(store, status=statuses.FAILED, error_type=ErrorType.SLOT_LEASE_EXPIRED)
    lifecycle.apply_provider_event(store, call, _event(call, statuses.FAILED))
    assert call.error_type == ErrorType.SLOT_LEASE_EXPIRED


def test_bolnas_own_failure_of_a_call_given_up_as_unknown_is_its_word_and_no_stale_status_overrules_it(store):
    call = _live(store, status=statuses.FAILED, error_type=ErrorType.BOLNA_OUTCOME_UNKNOWN, contact_id=7)
    call.slot_held = False
    lifecycle.apply_provider_event(store, call, _event(call, statuses.FAILED))
    assert (call.status, call.error_type, call.slot_held) == (statuses.FAILED, None, False)
    assert store.reopened_attempts == [call.id], "settled again on Bolna's failure, which its retry policy follows"
    assert [m.message_type for m in call.messages] == [MessageType.ATTEMPT_ENDED]
    lifecycle.apply_provider_event(store, call, _event(call, "ringing"))  # delivered late, out of order
    assert (call.status, call.error_type, call.slot_held) == (statuses.FAILED, None, False)


def test_a_call_given_up_as_unknown_holds_its_slot_again_when_bolna_calls_it_live(store):
    call = _live(store, status=statuses.FAILED, error_type=ErrorType.BOLNA_OUTCOME_UNKNOWN, execution_id=None)
    call.slot_held = False
    lifecycle.link_execution(store, call, "exec-late")
    lifecycle.apply_provider_event(store, call, _event(call, "in-progress"))
    assert (call.status, call.error_type, call.slot_held) == ("in-progress", None, True)
    assert call.slot_lease_expires_at == store.clock + timedelta(seconds=LEASE)
    lifecycle.apply_provider_event(store, call, _event(call, statuses.CALL_DISCONNECTED))
    lifecycle.apply_provider_event(store, call, _event(call, statuses.COMPLETED, conversation_duration=30))
    assert (call.status, call.slot_held, store.ledger) == (statuses.COMPLETED, False, {call.id: -1})


@pytest.mark.parametrize(
    ("current", "redial"),
    [("no-answer", "scheduled"), ("ringing", "scheduled"), ("initiated", "rescheduled"), ("queued", "ringing")],
)
def test_bolna_redialling_a_call_is_stopped_whatever_order_the_statuses_came_in(store, current, redial):
    call = _live(store, status=current)
    lifecycle.apply_provider_event(store, call, _event(call, redial, attempt=1))
    assert call.status == current
    assert call.messages == [
        Message(MessageType.EXECUTION_STOP, {"execution_id": call.execution_id, "call_id": str(call.id)})
    ]


def test_a_redial_that_ended_is_never_applied_nor_billed(store):
    call = _live(store, status="no-answer")
    call.slot_held = False
    lifecycle.apply_provider_event(store, call, _event(call, statuses.COMPLETED, attempt=1, conversation_duration=60))
    assert (call.status, call.messages, store.ledger) == ("no-answer", [], {})


def test_linking_an_execution_never_moves_the_status_back(store):
    call = _live(store, status="ringing", execution_id=None)
    lifecycle.link_execution(store, call, "exec-1", "queued")
    assert (call.execution_id, call.status) == ("exec-1", "ringing")


@pytest.mark.parametrize("answered", sorted(statuses.RELEASES_SLOT))
def test_an_answer_to_post_call_naming_the_lines_end_leaves_the_call_live_for_its_status_events(store, answered):
    call = store.add_call(store.add_user(max_concurrent_calls=1))
    assert _reserve(store, call)
    lifecycle.link_execution(store, call, "exec-1", answered)
    assert (call.execution_id, call.status, call.slot_held) == ("exec-1", statuses.INITIATING, True)
    lifecycle.apply_provider_event(store, call, _event(call, answered, conversation_duration=60))
    assert (call.status, call.slot_held) == (answered, False)


def test_a_reserved_slot_has_the_short_lease_until_bolna_names_the_execution(store):
    call = store.add_call(store.add_user(max_concurrent_calls=1))
    assert _reserve(store, call)
    assert call.slot_lease_expires_at == store.clock + timedelta(seconds=SHORT_LEASE)
    assert call.initiated_at == store.clock
    store.clock += timedelta(seconds=5)
    lifecycle.link_execution(store, call, "exec-1", "queued")
    assert call.slot_lease_expires_at == store.clock + timedelta(seconds=LEASE)
    assert call.provider_checked_at == store.clock


def test_a_live_call_keeps_its_slot_for_a_bounded_number_of_leases(store):
    call = _live(store)
    assert lifecycle.extend_lease(store, call, store.clock + timedelta(seconds=2 * LEASE), max_leases=3)
    assert call.slot_lease_expires_at == store.clock + timedelta(seconds=LEASE)
    later = store.clock + timedelta(seconds=3 * LEASE + 1)
    assert not lifecycle.extend_lease(store, call, later, max_leases=3)


def test_a_call_whose_answer_was_lost_keeps_its_slot_and_status_with_the_reason_on_record(store):
    call = store.add_call(store.add_user(max_concurrent_calls=1))
    assert _reserve(store, call)
    lifecycle.await_provider(call, "read timed out")
    assert (call.status, call.slot_held, call.error_detail) == (statuses.INITIATING, True, "read timed out")
    assert call.messages == [], "nothing is announced: no slot freed, nothing queued"
    linked = _live(store, status="ringing")
    lifecycle.await_provider(linked, "late")
    assert linked.error_detail is None, "a call Bolna already named is left alone"
