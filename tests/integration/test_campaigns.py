"""Campaign dispatch against this run's database, on a clock the test controls: direct calls first, round robin
between campaigns within each cap, calling windows in the recipient's time zone, retries after their interval,
pause, cancel and running out of credits."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text

from services.queue_processor.campaigns import CallingWindow, CampaignDispatch, time_zones_of
from services.queue_processor.dispatch import Dispatcher, DispatchTrigger
from shared.calls import lifecycle, statuses
from shared.campaigns import commands, spec, states
from shared.campaigns.views import campaign_view
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import Call, Campaign, CampaignContact, User, WebhookEvent
from shared.core.uow import UnitOfWork
from tests.support.components import components
from tests.support.factories import Customer, call_row, customer, load_call
from tests.support.placers import RecordingPlacer
from tests.support.stack import wait_until

NEW_YORK, LONDON, TOKYO = "+1212555{:04d}", "+44207946{:04d}", "+8131234{:04d}"
TWO_ZONES = "+522001234567"  # Mexico: Mexico City (UTC-6) and Tijuana (UTC-8)
NOON_UTC = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)  # a Tuesday: London 12:00, New York 07:00, Tokyo 21:00


class _Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _campaign(owner: Customer, numbers: list[str], **settings: object) -> uuid.UUID:
    contacts = spec.contacts_from_json([{"phoneNumber": number} for number in numbers])
    body = {"name": "Reminders", "agentId": str(owner.agent_id), **settings}
    with components().uow() as uow:
        created = commands.create_campaign(uow, owner.user_id, spec.CampaignSettings.model_validate(body), contacts)
        uow.commit()
    commands.change_status(components().uow, owner.user_id, str(created.campaign.id), states.Action.START)
    return created.campaign.id


def _dispatch(owner: Customer, clock: _Clock, scheduled: bool = False, ended: tuple[uuid.UUID, ...] = ()) -> list[Call]:
    """What a wake-up message makes the dispatcher do (the `slot.released` of each `ended` call, else one
    `call.queued`); `scheduled`: what the campaign scheduler job does."""
    placer = RecordingPlacer()
    dispatcher = Dispatcher(placer, concurrency=8, campaigns=CampaignDispatch(clock))
    if scheduled:
        dispatcher.settle_campaigns(owner.user_id)
        dispatcher.dispatch_pending(owner.user_id, DispatchTrigger.SCHEDULE)
    for call_id in ended or (None,):
        dispatcher.dispatch_pending(owner.user_id, DispatchTrigger.MESSAGE, call_id)
    assert dispatcher.wait_until_idle(30)
    return placer.placed


def _end(call_ids: list[uuid.UUID], status: str) -> None:
    """The calls ended at Bolna with `status` (as their webhooks would have it)."""
    with components().uow() as uow:
        for call_id in call_ids:
            call = uow.calls.lock_call(call_id)
            call.status = status
            call.slot_held = False
        uow.commit()


def _contacts(campaign_id: uuid.UUID) -> list[CampaignContact]:
    with components().uow() as uow:
        query = select(CampaignContact).where(CampaignContact.campaign_id == campaign_id)
        return list(uow.session.scalars(query.order_by(CampaignContact.row_number)))


def _campaign_row(campaign_id: uuid.UUID) -> Campaign:
    with components().uow() as uow:
        return uow.session.get_one(Campaign, campaign_id)


def _view(campaign_id: uuid.UUID) -> dict:
    with components().uow() as uow:
        return campaign_view(uow.session, uow.session.get_one(Campaign, campaign_id))


def test_the_calling_window_follows_each_contacts_own_time_zone():
    owner = customer(credits=1000, max_concurrent_calls=50)
    numbers = [NEW_YORK.format(i) for i in range(3)] + [LONDON.format(i) for i in range(3)]
    numbers += [TOKYO.format(i) for i in range(3)]
    campaign_id = _campaign(owner, numbers, callingWindow={"startHour": 9, "endHour": 18})
    clock = _Clock(NOON_UTC)

    placed = _dispatch(owner, clock)
    assert sorted(call.phone_number for call in placed) == sorted(LONDON.format(i) for i in range(3))
    view = _view(campaign_id)
    assert view["contacts"]["waitingForWindow"] == 6, "New York and Tokyo wait for their window"
    waiting = {c.phone_number: c.next_attempt_at for c in _contacts(campaign_id) if c.state == states.WAITING}
    assert {waiting[NEW_YORK.format(i)] for i in range(3)} == {datetime(2026, 12, 1, 14, 0, tzinfo=UTC)}
    assert {waiting[TOKYO.format(i)] for i in range(3)} == {datetime(2026, 12, 2, 0, 0, tzinfo=UTC)}

    clock.now = datetime(2026, 12, 1, 13, 59, tzinfo=UTC)
    assert _dispatch(owner, clock) == [], "a minute before New York's 9:00 nobody is called"
    clock.now = datetime(2026, 12, 1, 14, 0, 30, tzinfo=UTC)
    assert sorted(call.phone_number for call in _dispatch(owner, clock)) == sorted(NEW_YORK.format(i) for i in range(3))
    clock.now = datetime(2026, 12, 2, 0, 0, 30, tzinfo=UTC)
    assert sorted(call.phone_number for call in _dispatch(owner, clock)) == sorted(TOKYO.format(i) for i in range(3))
    assert _view(campaign_id)["contacts"]["waitingForWindow"] == 0


def test_a_number_ringing_in_several_time_zones_is_called_only_when_the_window_is_open_in_all():
    window = CallingWindow(9, 18, None)
    tijuana_nine = datetime(2026, 12, 1, 17, 0, tzinfo=UTC)  # Mexico City 11:00, Tijuana 09:00
    zones = time_zones_of(TWO_ZONES)
    assert {zone.key for zone in zones} == {"America/Mexico_City", "America/Tijuana"}
    opening = window.next_opening(TWO_ZONES, tijuana_nine - timedelta(hours=2))
    assert opening == tijuana_nine, "open once it is 9:00 in the western of its zones, not at 9:00 in the eastern"
    assert all(window.is_open(zone, opening) for zone in zones)


def test_a_number_whose_zones_never_share_the_window_is_called_in_its_middle_zone():
    window = CallingWindow(9, 18, None)
    toll_free = "+18005550123"  # may ring anywhere from Halifax to Honolulu: 9 to 18 is never open in all at once
    now = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    opening = window.next_opening(toll_free, now)
    assert now < opening <= now + timedelta(days=1), "it is called, within a day"
    assert window.next_opening(toll_free, opening) == opening, "and the window is open at that time"


def test_calling_days_are_the_contacts_local_weekdays():
    window = CallingWindow(9, 18, [1, 2, 3, 4, 5])
    saturday_noon_london = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    assert window.next_opening(LONDON.format(1), saturday_noon_london) == datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


def test_direct_calls_waiting_go_before_the_customers_campaign_calls():
    owner = customer(credits=1000, max_concurrent_calls=2)
    _campaign(owner, [LONDON.format(i) for i in range(5)])
    direct = [call_row(owner).id for _ in range(3)]
    placed = _dispatch(owner, _Clock(NOON_UTC))
    assert sorted(call.id for call in placed) == sorted(direct[:2]), "both free slots go to the oldest direct calls"
    _end(direct[:2], "completed")
    placed = _dispatch(owner, _Clock(NOON_UTC), ended=tuple(direct[:2]))
    # Placed on the dispatcher's threads, so in no set order: what matters is who got the two slots.
    assert len(placed) == 2
    assert [call.id for call in placed if call.campaign_id is None] == [direct[2]], "the waiting direct call first"


def test_campaign_calls_get_only_the_placing_threads_the_direct_backlog_left():
    owner = customer(credits=1000, max_concurrent_calls=40)
    _campaign(owner, [LONDON.format(i) for i in range(20)])
    direct = [call_row(owner).id for _ in range(15)]
    placer = RecordingPlacer()
    dispatcher = Dispatcher(placer, concurrency=4, campaigns=CampaignDispatch(_Clock(NOON_UTC)))
    dispatcher.dispatch_pending(owner.user_id, DispatchTrigger.MESSAGE)
    assert dispatcher.wait_until_idle(30)
    assert len(placer.placed) == 35
    with components().uow() as uow:
        reserved = uow.session.execute(
            select(Call.campaign_id.is_(None), Call.initiated_at).where(Call.user_id == owner.user_id)
        ).all()
    last_direct = max(at for is_direct, at in reserved if is_direct)
    first_campaign = min(at for is_direct, at in reserved if not is_direct)
    assert sorted(call.id for call in placer.placed if call.campaign_id is None) == sorted(direct)
    assert first_campaign >= last_direct, "no campaign call reserved while a direct call still waited"


def test_a_campaign_call_back_in_the_queue_keeps_to_the_calling_window():
    owner = customer(credits=1000, max_concurrent_calls=5)
    _campaign(owner, [NEW_YORK.format(1)], callingWindow={"startHour": 9, "endHour": 18})
    evening = datetime(2026, 12, 1, 22, 0, tzinfo=UTC)  # New York 17:00: open
    (call,) = _dispatch(owner, _Clock(evening))
    with components().uow() as uow:  # a 429: back in the queue, due at once
        lifecycle.requeue(uow.calls, uow.calls.lock_call(call.id), 0, "429")
        uow.commit()
    assert _dispatch(owner, _Clock(evening + timedelta(hours=2))) == [], "19:00 in New York: not now"
    with components().uow() as uow:
        waiting = uow.session.get_one(Call, call.id)
    assert (waiting.status, waiting.next_attempt_at) == (statuses.PENDING, datetime(2026, 12, 2, 14, 0, tzinfo=UTC))


def test_a_call_sent_back_to_the_queue_after_its_campaign_was_canceled_is_canceled_too():
    owner = customer(credits=1000, max_concurrent_calls=5)
    campaign_id = _campaign(owner, [LONDON.format(1), LONDON.format(2)])
    (first, second) = _dispatch(owner, _Clock(NOON_UTC))
    commands.change_status(components().uow, owner.user_id, str(campaign_id), states.Action.CANCEL)
    with components().uow() as uow:  # Bolna's 429 arrives after the cancel: the call goes back to the queue
        lifecycle.requeue(uow.calls, uow.calls.lock_call(first.id), 0, "429")
        uow.commit()
    _end([second.id], "completed")
    _dispatch(owner, _Clock(NOON_UTC), scheduled=True)
    with components().uow() as uow:
        assert uow.session.get_one(Call, first.id).status == statuses.CANCELED
    assert _view(campaign_id)["contacts"]["calling"] == 0


def test_campaigns_of_one_customer_share_free_slots_round_robin_within_their_caps():
    owner = customer(credits=1000, max_concurrent_calls=4)
    first = _campaign(owner, [LONDON.format(i) for i in range(20)])
    second = _campaign(owner, [LONDON.format(100 + i) for i in range(20)])
    placed = _dispatch(owner, _Clock(NOON_UTC))
    assert sorted(call.campaign_id for call in placed) == sorted([first, first, second, second])
    split = {first: 0, second: 0}
    for _ in range(10):  # one slot frees at a time: it alternates
        freed = placed[0]
        _end([freed.id], "completed")
        placed = placed[1:] + _dispatch(owner, _Clock(NOON_UTC), ended=(freed.id,))
        split[placed[-1].campaign_id] += 1
    assert split == {first: 5, second: 5}

    capped_owner = customer(credits=1000, max_concurrent_calls=4)
    capped = _campaign(capped_owner, [LONDON.format(i) for i in range(20)], maxConcurrency=1)
    free = _campaign(capped_owner, [LONDON.format(100 + i) for i in range(20)])
    placed = _dispatch(capped_owner, _Clock(NOON_UTC))
    assert sorted(str(call.campaign_id) for call in placed) == sorted([str(capped)] + [str(free)] * 3)


def test_a_retry_waits_its_interval_and_the_campaign_completes_when_every_contact_is_final():
    owner = customer(credits=1000, max_concurrent_calls=5)
    retry = {"maxAttempts": 2, "onStatuses": ["no-answer"], "intervalMinutes": [30]}
    campaign_id = _campaign(owner, [LONDON.format(1), LONDON.format(2)], retry=retry)
    clock = _Clock(NOON_UTC)
    first, second = _dispatch(owner, clock)
    _end([first.id], "no-answer")
    _end([second.id], "busy")  # not in the policy: final
    assert _dispatch(owner, clock, ended=(first.id, second.id)) == [], "the retry waits for its interval"
    contacts = {c.phone_number: c for c in _contacts(campaign_id)}
    assert contacts[first.phone_number].state == states.WAITING
    assert contacts[first.phone_number].next_attempt_at == NOON_UTC + timedelta(minutes=30)
    assert (contacts[second.phone_number].state, contacts[second.phone_number].final_status) == (states.DONE, "busy")

    clock.now = NOON_UTC + timedelta(minutes=31)
    (retried,) = _dispatch(owner, clock)
    assert retried.phone_number == first.phone_number and retried.contact_id == first.contact_id
    _end([retried.id], "no-answer")
    assert _dispatch(owner, clock, ended=(retried.id,)) == []
    campaign = _campaign_row(campaign_id)
    assert campaign.status == states.COMPLETED and campaign.finished_at is not None
    view = _view(campaign_id)
    assert view["results"] == {"no-answer": 1, "busy": 1}
    assert view["attempts"] == 3 and view["calls"] == {"no-answer": 2, "busy": 1}


def test_a_retry_due_at_once_takes_the_slot_its_own_attempt_freed_in_the_same_dispatch():
    owner = customer(credits=1000, max_concurrent_calls=1)
    retry = {"maxAttempts": 2, "onStatuses": ["no-answer"], "intervalMinutes": [0]}
    _campaign(owner, [LONDON.format(1)], retry=retry)
    (call,) = _dispatch(owner, _Clock(NOON_UTC))
    _end([call.id], "no-answer")
    (retried,) = _dispatch(owner, _Clock(NOON_UTC), ended=(call.id,))
    assert (retried.contact_id, retried.id != call.id) == (call.contact_id, True)


@pytest.mark.parametrize(("on_statuses", "retried"), [(["balance-low"], True), (["no-answer", "busy"], False)])
def test_a_contact_bolna_ended_as_balance_low_is_retried_only_when_the_policy_names_it(on_statuses, retried):
    owner = customer(credits=1000, max_concurrent_calls=1)
    retry = {"maxAttempts": 2, "onStatuses": on_statuses, "intervalMinutes": [0]}
    campaign_id = _campaign(owner, [LONDON.format(1)], retry=retry)
    (call,) = _dispatch(owner, _Clock(NOON_UTC))
    _end([call.id], "balance-low")
    again = _dispatch(owner, _Clock(NOON_UTC), ended=(call.id,))
    assert [c.contact_id for c in again] == ([call.contact_id] if retried else [])
    (contact,) = _contacts(campaign_id)
    assert (contact.state == states.DONE, contact.final_status) == ((False, None) if retried else (True, "balance-low"))


def test_the_slot_released_by_an_attempt_settles_its_contact_even_when_no_slot_is_free_any_more():
    owner = customer(credits=1000, max_concurrent_calls=1)
    campaign_id = _campaign(owner, [LONDON.format(1), LONDON.format(2)])
    (call,) = _dispatch(owner, _Clock(NOON_UTC))
    _end([call.id], "completed")
    call_row(owner, status="in-progress", slot_held=True)  # a direct call took the freed slot first
    assert _dispatch(owner, _Clock(NOON_UTC), ended=(call.id,)) == []
    contact = next(c for c in _contacts(campaign_id) if c.phone_number == call.phone_number)
    assert (contact.state, contact.final_status) == (states.DONE, "completed")


def test_a_callflow_failure_is_never_retried_as_if_bolna_had_said_no_answer():
    owner = customer(credits=1000, max_concurrent_calls=5)
    retry = {"maxAttempts": 3, "onStatuses": ["failed"], "intervalMinutes": [0]}
    campaign_id = _campaign(owner, [LONDON.format(1)], retry=retry)
    (call,) = _dispatch(owner, _Clock(NOON_UTC))
    with components().uow() as uow:
        locked = uow.calls.lock_call(call.id)
        locked.status, locked.error_type, locked.slot_held = statuses.FAILED, "bolna_outcome_unknown", False
        uow.commit()
    assert _dispatch(owner, _Clock(NOON_UTC), ended=(call.id,)) == [], "Bolna may have dialled it: not again"
    assert _campaign_row(campaign_id).status == states.COMPLETED


def test_a_settling_does_not_close_a_contact_on_a_failure_bolnas_word_is_overruling():
    """The `slot.released` of a call Callflow gave up on settles its contact while Bolna's word for that call, a
    webhook overruling the failure, is applied and not yet committed: the settling reads the call as failed, and
    the webhook reopens only a contact already settled."""
    owner, campaign_id, call = _campaign_call_given_up()
    with components().uow() as webhook:
        live = _overruled(webhook, call.id, "ringing")
        with _settling_alongside(webhook, owner.user_id, call.id):
            pass
    (contact,) = _contacts(campaign_id)
    assert (live.status, contact.state, contact.final_status) == ("ringing", states.CALLING, None)


def test_a_settling_and_bolnas_completed_overruling_a_failure_do_not_deadlock():
    """The settling holds the customer's lock and reads the contact and its call, which the webhook holds; the
    webhook's charge then needs the customer's lock. The settling leaves the contact to a later round."""
    owner, campaign_id, call = _campaign_call_given_up()
    with components().uow() as webhook:
        webhook.calls.lock_call(call.id)  # its call found, by our id echoed back
        with _settling_alongside(webhook, owner.user_id, call.id):
            _overruled(webhook, call.id, "completed")
    _settle(owner.user_id, call.id)  # the webhook's own message, or the scheduler's next round
    (contact,) = _contacts(campaign_id)
    assert (contact.state, contact.final_status) == (states.DONE, "completed")
    assert load_call(call.id).credits_charged == 2


def test_a_campaign_is_not_completed_while_bolnas_word_reopens_one_of_its_contacts():
    """The settling of the campaign's last open contact completes it while Bolna's word for another contact's call,
    given up and settled, reopens that contact and is not yet committed."""
    owner, campaign_id, given_up, last = _campaign_with_a_given_up_attempt_settled_and_one_ended()
    with components().uow() as webhook:
        _overruled(webhook, given_up.id, "ringing")
        with _settling_alongside(webhook, owner.user_id, last.id):
            pass
    assert [contact.state for contact in _contacts(campaign_id)] == [states.CALLING, states.DONE]
    assert _campaign_row(campaign_id).status == states.RUNNING, "a contact is being called"


def test_a_campaign_completed_while_bolnas_completed_reopens_a_contact_is_reopened_without_deadlock():
    """Bolna's `completed` overruling a failure charges (the customer's lock) and reopens the contact (the campaign's
    lock) while the settling of the last open contact holds the customer's lock and completes the campaign."""
    owner, campaign_id, given_up, last = _campaign_with_a_given_up_attempt_settled_and_one_ended()
    with components().uow() as settling:
        settling.calls.lock_user(owner.user_id)
        webhook = _Overruling(given_up.id, "completed")
        webhook.start()
        wait_until(lambda: not webhook.is_alive() or _waits_for(settling), 10, "the webhook waits to charge")
        CampaignDispatch(_Clock(NOON_UTC)).settle(settling, owner.user_id, last.id)
        settling.commit()
    webhook.join(30)
    assert not webhook.is_alive() and webhook.error is None, webhook.error
    assert _campaign_row(campaign_id).status == states.RUNNING, "reopened by the contact Bolna's word reopened"
    _settle(owner.user_id, given_up.id)  # the webhook's own message
    assert [(c.state, c.final_status) for c in _contacts(campaign_id)] == [
        (states.DONE, "completed"),
        (states.DONE, "completed"),
    ]
    assert _campaign_row(campaign_id).status == states.COMPLETED
    assert load_call(given_up.id).credits_charged == 2


def _campaign_with_a_given_up_attempt_settled_and_one_ended() -> tuple[Customer, uuid.UUID, Call, Call]:
    """A campaign of two contacts: the first one's call given up as `bolna_outcome_unknown` and its contact settled
    (done), the second one's call completed and its contact not settled yet."""
    owner = customer(credits=1000, max_concurrent_calls=5)
    campaign_id = _campaign(owner, [LONDON.format(1), LONDON.format(2)])
    given_up, last = sorted(_dispatch(owner, _Clock(NOON_UTC)), key=lambda call: call.phone_number)
    with components().uow() as uow:
        call = uow.calls.lock_call(given_up.id)
        call.status, call.error_type, call.slot_held = statuses.FAILED, "bolna_outcome_unknown", False
        uow.commit()
    _settle(owner.user_id, given_up.id)
    _end([last.id], "completed")
    assert [contact.state for contact in _contacts(campaign_id)] == [states.DONE, states.CALLING]
    return owner, campaign_id, given_up, last


class _Overruling(threading.Thread):
    """Bolna's webhook overruling Callflow's failure of a call, applied and committed on a thread of its own."""

    def __init__(self, call_id: uuid.UUID, status: str):
        super().__init__()
        self.call_id, self.status = call_id, status
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with components().uow() as webhook:
                _overruled(webhook, self.call_id, self.status)
                webhook.commit()
        except BaseException as exc:
            self.error = exc


def _campaign_call_given_up() -> tuple[Customer, uuid.UUID, Call]:
    """A campaign's one call, placed, then given up as `bolna_outcome_unknown` (its answer lost, nothing found)."""
    owner = customer(credits=1000, max_concurrent_calls=5)
    campaign_id = _campaign(owner, [LONDON.format(1)])
    (call,) = _dispatch(owner, _Clock(NOON_UTC))
    with components().uow() as uow:
        given_up = uow.calls.lock_call(call.id)
        given_up.status, given_up.error_type, given_up.slot_held = statuses.FAILED, "bolna_outcome_unknown", False
        uow.commit()
    return owner, campaign_id, call


def _overruled(webhook: UnitOfWork, call_id: uuid.UUID, status: str) -> Call:
    """Bolna's webhook of `status` for the call, naming our id, applied as provider_events does, not committed."""
    execution_id = str(uuid.uuid4())
    live = webhook.calls.lock_call(call_id)
    lifecycle.link_execution(webhook.calls, live, execution_id)
    word = {"id": execution_id, "status": status, "telephony_data": {"duration": "61"}}
    event = WebhookEvent(execution_id=execution_id, status=status, attempt=0, payload=word)
    lifecycle.apply_provider_event(webhook.calls, live, event)
    return live


def _waits_for(holder: UnitOfWork) -> bool:
    """Whether another transaction waits for a lock `holder`'s transaction holds."""
    pid = holder.session.scalar(text("SELECT pg_backend_pid()"))
    with components().engine.connect() as connection:
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"
        return connection.scalar(text(waiting), {"pid": pid}) > 0


@contextmanager
def _settling_alongside(webhook: UnitOfWork, user_id: uuid.UUID, call_id: uuid.UUID) -> Iterator[None]:
    """Settles the attempt `call_id` ended on a thread of its own while `webhook`'s transaction is open: the block
    runs once the settling waits for a lock the webhook holds (or is done); then the webhook commits, and the
    settling must finish without an error."""
    settling = _Settling(user_id, call_id)
    settling.start()
    wait_until(lambda: not settling.is_alive() or _waits_for(webhook), 10, "the settling runs")
    yield
    webhook.commit()
    settling.join(30)
    assert not settling.is_alive() and settling.error is None, settling.error


class _Settling(threading.Thread):
    """What the `slot.released` of a call makes the dispatcher do first, on a thread of its own; keeps its error."""

    def __init__(self, user_id: uuid.UUID, call_id: uuid.UUID):
        super().__init__()
        self.user_id, self.call_id = user_id, call_id
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            _settle(self.user_id, self.call_id)
        except BaseException as exc:
            self.error = exc


def _settle(user_id: uuid.UUID, call_id: uuid.UUID) -> None:
    """Settles the attempt `call_id` ended, under the customer's lock, as the dispatcher does."""
    with components().uow() as uow:
        uow.calls.lock_user(user_id)
        CampaignDispatch(_Clock(NOON_UTC)).settle(uow, user_id, call_id)
        uow.commit()


def test_cancel_ends_waiting_contacts_and_queued_calls_and_holds_no_slot():
    owner = customer(credits=1000, max_concurrent_calls=2)
    campaign_id = _campaign(owner, [LONDON.format(i) for i in range(6)])
    placed = _dispatch(owner, _Clock(NOON_UTC))
    assert len(placed) == 2
    with components().uow() as uow:  # Bolna sent one back to the queue (a 429): it waits as a pending call
        call = uow.calls.lock_call(placed[0].id)
        lifecycle.requeue(uow.calls, call, 0, "429")
        uow.commit()
    commands.change_status(components().uow, owner.user_id, str(campaign_id), states.Action.CANCEL)
    with components().uow() as uow:
        assert uow.session.get_one(Call, placed[0].id).status == statuses.CANCELED
    _end([placed[1].id], "completed")  # the call at Bolna finished normally
    assert _dispatch(owner, _Clock(NOON_UTC), scheduled=True) == []
    view = _view(campaign_id)
    assert view["status"] == states.CANCELED
    assert view["contacts"] == {"waiting": 0, "calling": 0, "done": 6, "total": 6, "waitingForWindow": 0}
    assert view["results"] == {"canceled": 5, "completed": 1}
    with components().uow() as uow:
        held = uow.session.scalar(select(func.count()).where(Call.user_id == owner.user_id, Call.slot_held))
    assert held == 0


def test_pause_stops_dispatch_and_resume_picks_up_where_it_stopped():
    owner = customer(credits=1000, max_concurrent_calls=2)
    campaign_id = _campaign(owner, [LONDON.format(i) for i in range(4)])
    commands.change_status(components().uow, owner.user_id, str(campaign_id), states.Action.PAUSE)
    assert _dispatch(owner, _Clock(NOON_UTC)) == []
    commands.change_status(components().uow, owner.user_id, str(campaign_id), states.Action.RESUME)
    assert len(_dispatch(owner, _Clock(NOON_UTC))) == 2
    view = _view(campaign_id)
    assert (view["contacts"]["calling"], view["contacts"]["waiting"]) == (2, 2)


def test_running_out_of_credits_pauses_the_campaign_with_the_reason_until_resumed():
    owner = customer(credits=1000, max_concurrent_calls=2)
    campaign_id = _campaign(owner, [LONDON.format(i) for i in range(4)])
    with components().uow() as uow:
        uow.calls.lock_user(owner.user_id).credits = 0
        uow.commit()
    assert _dispatch(owner, _Clock(NOON_UTC)) == []
    campaign = _campaign_row(campaign_id)
    assert (campaign.status, campaign.pause_reason) == (states.PAUSED, states.PAUSED_NO_CREDITS)
    with components().uow() as uow:
        uow.session.get_one(User, owner.user_id).credits = 10
        uow.commit()
    assert _dispatch(owner, _Clock(NOON_UTC)) == [], "it resumes only when asked"
    commands.change_status(components().uow, owner.user_id, str(campaign_id), states.Action.RESUME)
    assert len(_dispatch(owner, _Clock(NOON_UTC))) == 2


def test_a_start_time_ahead_keeps_the_campaign_scheduled_until_it_comes():
    owner = customer(credits=1000, max_concurrent_calls=2)
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    campaign_id = _campaign(owner, [LONDON.format(1)], startAt=start.isoformat())
    assert _campaign_row(campaign_id).status == states.SCHEDULED
    assert _dispatch(owner, _Clock(start - timedelta(seconds=1))) == []
    assert len(_dispatch(owner, _Clock(start + timedelta(hours=1)))) == 1
    assert _campaign_row(campaign_id).status == states.RUNNING


def test_another_customers_agent_cannot_run_a_campaign():
    owner, stranger = customer(), customer()
    contacts = spec.contacts_from_json([{"phoneNumber": LONDON.format(1)}])
    settings = spec.CampaignSettings.model_validate({"name": "x", "agentId": str(stranger.agent_id)})
    with components().uow() as uow, pytest.raises(CallflowError) as refused:
        commands.create_campaign(uow, owner.user_id, settings, contacts)
    assert refused.value.error_type == ErrorType.UNAUTHORIZED_AGENT_ACCESS


def test_the_scheduler_visits_only_customers_with_campaign_work_due():
    waiting_owner, ended_owner = customer(credits=1000), customer(credits=1000)
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    _campaign(waiting_owner, [LONDON.format(1)], startAt=start.isoformat())
    paused = _campaign(ended_owner, [LONDON.format(1), LONDON.format(2)])
    (call, _) = _dispatch(ended_owner, _Clock(NOON_UTC))
    commands.change_status(components().uow, ended_owner.user_id, str(paused), states.Action.PAUSE)

    def visited(now: datetime) -> set[uuid.UUID]:
        dispatcher = Dispatcher(RecordingPlacer(), concurrency=1, campaigns=CampaignDispatch(_Clock(now)))
        return set(dispatcher.users_with_campaign_work()) & {waiting_owner.user_id, ended_owner.user_id}

    assert visited(NOON_UTC) == set(), "a start a month ahead and two calls under way: nothing to do"
    _end([call.id], "completed")
    assert visited(NOON_UTC) == {ended_owner.user_id}, "a paused campaign's ended attempt is settled"
    assert visited(start + timedelta(seconds=1)) == {waiting_owner.user_id, ended_owner.user_id}


def test_a_direct_call_queued_while_a_dispatch_waited_for_a_thread_still_goes_first():
    owner = customer(credits=1000, max_concurrent_calls=1)
    _campaign(owner, [LONDON.format(1)])
    dispatcher = Dispatcher(RecordingPlacer(), concurrency=1, campaigns=CampaignDispatch(_Clock(NOON_UTC)))
    stale = dispatcher._work_due(owner.user_id)  # read before the direct call existed
    assert (stale.direct, stale.campaigns) == (False, True)
    direct = call_row(owner)
    [(reserved, _agent)], _left = dispatcher._reserve_due(owner.user_id, 1, stale)
    assert reserved.id == direct.id


def test_a_move_is_judged_on_the_status_found_under_the_lock_not_on_an_earlier_read():
    owner = customer(credits=1000)
    campaign_id = _campaign(owner, [LONDON.format(1)])
    with components().uow() as holder:
        holder.calls.lock_user(owner.user_id)  # another move in progress: it holds the customer's lock
        outcome: list[str] = []
        pausing = threading.Thread(
            target=lambda: outcome.append(_move(owner, campaign_id, states.Action.PAUSE)), daemon=True
        )
        pausing.start()
        time.sleep(0.5)  # the pause has read the campaign (running) and waits for the lock
        holder.session.get_one(Campaign, campaign_id).status = states.CANCELED
        holder.commit()
    pausing.join(10)
    assert outcome == ["invalid_campaign_transition"], "a canceled campaign cannot be paused"
    assert _campaign_row(campaign_id).status == states.CANCELED


def _move(owner: Customer, campaign_id: uuid.UUID, action: states.Action) -> str:
    try:
        return commands.change_status(components().uow, owner.user_id, str(campaign_id), action).status
    except CallflowError as exc:
        return str(exc.error_type)
