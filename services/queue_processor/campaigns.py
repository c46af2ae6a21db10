"""Choosing a customer's next campaign calls, within the slots their direct calls left free.

How the next contact is chosen, and at what cost (docs/architecture.md has the picture):
- The customer's running campaigns share the free slots round robin: one slot at a time, starting with the
  campaign served longest ago (`last_dispatched_at`), each up to its `maxConcurrency` (its calls holding a slot
  are counted by an index on held slots per campaign).
- Within a campaign, its calls Bolna sent back to the queue go first, then its waiting contacts in the order they
  became due (`next_attempt_at`, then their row): one index range scan of `ix_campaign_contacts_due` that stops
  after the few rows it needs, whatever the campaign's size.
- A contact whose calling window is closed (in its own time zone) is not called: its `next_attempt_at` moves to the
  window's next opening, so it is looked at once per opening, never rescanned per freed slot.
Campaign scheduling (startAt, retry intervals, calling windows) runs on the queue-processor's clock, which the
tests control; slots and leases stay on the database's.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from phonenumbers import timezone as number_time_zones
from sqlalchemy import BindParameter, ColumnElement, Select, exists, func, or_, select

from shared.calls import lifecycle, statuses
from shared.campaigns import states
from shared.core.models import Call, Campaign, CampaignContact, User
from shared.core.uow import UnitOfWork
from shared.observability.scrubbing import mask_phone

Clock = Callable[[], datetime]
log = logging.getLogger(__name__)
MAX_WINDOW_SEARCH_DAYS = 8
MAX_WINDOW_ROUNDS = 8  # zones that overlap agree within a few rounds of "the latest of their next openings"
# Contacts one campaign's turn reads in one dispatch: a window that just closed for thousands of them is pushed
# forward a few hundred at a time, not in one transaction holding the customer's lock.
MAX_CONTACTS_READ_PER_TURN = 500
CONTACT_BATCH = 50  # contacts read at once with a window: enough to skip those outside it without a read for each
_UTC = ZoneInfo("UTC")


def system_clock() -> datetime:
    return datetime.now(UTC)


@functools.lru_cache(maxsize=65_536)
def time_zones_of(phone_number: str) -> tuple[ZoneInfo, ...]:
    """The time zones the number may ring in (several for some countries); UTC when phonenumbers knows none."""
    try:
        names = number_time_zones.time_zones_for_number(phonenumbers.parse(phone_number, None))
    except phonenumbers.NumberParseException:
        names = ()
    zones = []
    for name in names:
        try:
            zones.append(ZoneInfo(name))
        except (ZoneInfoNotFoundError, ValueError):
            log.warning("time zone %s of %s is unknown to this system's time zone data", name, mask_phone(phone_number))
    if not zones:
        log.warning("no known time zone for %s: its calling window is kept in UTC", mask_phone(phone_number))
    return tuple(zones) or (_UTC,)


class CallingWindow:
    """Hours [start, end) on some ISO weekdays, in the recipient's local time. A number with several time zones
    may be called only when the window is open in all of them (the most restrictive)."""

    def __init__(self, start_hour: int, end_hour: int, days: list[int] | None):
        self.start_hour, self.end_hour = start_hour, end_hour
        self.days = frozenset(days or range(1, 8))

    @classmethod
    def of(cls, campaign: Campaign) -> CallingWindow | None:
        if campaign.window_start_hour is None or campaign.window_end_hour is None:
            return None
        return cls(campaign.window_start_hour, campaign.window_end_hour, campaign.window_days)

    def is_open(self, zone: ZoneInfo, at: datetime) -> bool:
        local = at.astimezone(zone)
        return local.isoweekday() in self.days and self.start_hour <= local.hour < self.end_hour

    def next_opening(self, phone_number: str, now: datetime) -> datetime:
        """`now` when the window is open for the number, else when it next opens in all its zones. A number whose
        zones' windows never overlap (a toll-free or a nationwide mobile range spanning many hours) is called in the
        window of its middle zone instead: no single local time is right for it, and it must not wait forever."""
        zones = time_zones_of(phone_number)
        if len(zones) > 1 and not self._overlaps(zones, now):
            zones = (_middle_zone(zones, now),)
        candidate = now
        for _ in range(MAX_WINDOW_ROUNDS):
            if all(self.is_open(zone, candidate) for zone in zones):
                return candidate
            candidate = max(self._opening_in(zone, candidate) for zone in zones)
        return self._opening_in(_middle_zone(zones, now), now)

    def _overlaps(self, zones: tuple[ZoneInfo, ...], now: datetime) -> bool:
        """Whether the window can be open in all the zones at once: their UTC offsets differ by less than its length."""
        offsets = [now.astimezone(zone).utcoffset() or timedelta() for zone in zones]
        return max(offsets) - min(offsets) < timedelta(hours=self.end_hour - self.start_hour)

    def _opening_in(self, zone: ZoneInfo, at: datetime) -> datetime:
        if self.is_open(zone, at):
            return at
        local = at.astimezone(zone)
        for days_ahead in range(MAX_WINDOW_SEARCH_DAYS):
            day = local.date() + timedelta(days=days_ahead)
            opening = datetime(day.year, day.month, day.day, self.start_hour, tzinfo=zone)
            if day.isoweekday() in self.days and opening > local:
                return opening.astimezone(UTC)
        return at + timedelta(days=1)


def _middle_zone(zones: tuple[ZoneInfo, ...], now: datetime) -> ZoneInfo:
    return sorted(zones, key=lambda zone: now.astimezone(zone).utcoffset() or timedelta())[len(zones) // 2]


def running_campaigns_query(user_id: uuid.UUID) -> Select[tuple[Campaign]]:
    """The user's active campaigns, the one served longest ago first, locked (built apart so its plan is tested)."""
    return (
        select(Campaign)
        .where(Campaign.user_id == user_id, Campaign.status.in_(states.ACTIVE))
        .order_by(Campaign.last_dispatched_at.asc().nulls_first(), Campaign.id)
        .with_for_update(key_share=True)
    )


def held_by_campaign_query(campaign_id: uuid.UUID) -> Select[tuple[int]]:
    return select(func.count()).where(Call.campaign_id == campaign_id, Call.slot_held)


def queued_campaign_calls_query(campaign_id: uuid.UUID, limit: int) -> Select[tuple[Call]]:
    """The campaign's calls Bolna sent back to the queue, due again."""
    return (
        select(Call)
        .where(
            Call.campaign_id == campaign_id,
            Call.status == statuses.PENDING,
            or_(Call.next_attempt_at.is_(None), Call.next_attempt_at <= func.now()),
        )
        .order_by(Call.created_at)
        .limit(limit)
        .with_for_update(key_share=True)
    )


def due_contacts_query(campaign_id: uuid.UUID, now: datetime, limit: int) -> Select[tuple[CampaignContact]]:
    return (
        select(CampaignContact)
        .where(
            CampaignContact.campaign_id == campaign_id,
            CampaignContact.state == states.WAITING,
            CampaignContact.next_attempt_at <= now,
        )
        .order_by(CampaignContact.next_attempt_at, CampaignContact.id)
        .limit(limit)
        .with_for_update(skip_locked=True, key_share=True)
    )


def finished_attempts_query(
    user_id: uuid.UUID, call_id: uuid.UUID | None = None
) -> Select[tuple[CampaignContact, Call]]:
    """The user's contacts being called whose call has ended: their result is settled next. With `call_id`, only
    that call's contact: two primary-key reads, whatever the number of contacts being called.

    Its call is locked too, and a contact whose call another transaction holds is skipped: that may be Bolna's word
    overruling a failure Callflow gave the call (its webhook reopens only a contact already settled). Waiting for it
    would deadlock when that word is a `completed`, whose charge waits for the customer's lock the caller holds; the
    change it makes is settled on its own message, or on the scheduler's next round."""
    query = (
        select(CampaignContact, Call)
        .join(Campaign, Campaign.id == CampaignContact.campaign_id)
        .join(Call, Call.id == CampaignContact.last_call_id)
        .where(
            Campaign.user_id == user_id,
            CampaignContact.state == states.CALLING,
            Call.status.in_(statuses.TERMINAL),
        )
        .with_for_update(of=(CampaignContact, Call), key_share=True, skip_locked=True)
    )
    if call_id is not None:
        query = query.where(_attempt_of(call_id))
    return query


def campaign_lock_query(campaign_id: uuid.UUID) -> Select[tuple[uuid.UUID]]:
    """The campaign's row, locked: waits for a webhook reopening one of its contacts (`finish_if_done`)."""
    return select(Campaign.id).where(Campaign.id == campaign_id).with_for_update(key_share=True)


def has_open_contacts_query(campaign_id: uuid.UUID) -> Select[tuple[bool]]:
    """Whether a contact still waits or is being called (two probes of the partial indexes, never a count)."""
    contacts = CampaignContact
    return select(
        exists().where(contacts.campaign_id == campaign_id, contacts.state == states.WAITING)
        | exists().where(contacts.campaign_id == campaign_id, contacts.state == states.CALLING)
    )


def _contact_due(now: datetime | BindParameter[datetime]) -> Select[tuple[int]]:
    return select(CampaignContact.id).where(
        CampaignContact.campaign_id == Campaign.id,
        CampaignContact.state == states.WAITING,
        CampaignContact.next_attempt_at <= now,
    )


def _requeued_call_due() -> Select[tuple[uuid.UUID]]:
    return select(Call.id).where(
        Call.campaign_id == Campaign.id,
        Call.status == statuses.PENDING,
        or_(Call.next_attempt_at.is_(None), Call.next_attempt_at <= func.now()),
    )


def _calls_due(now: datetime | BindParameter[datetime]) -> ColumnElement[bool]:
    """An active campaign with a call to place at `now`: its start time reached, a contact due, or a call back in
    the queue and due. (Attempts that ended are not looked for here: that would visit every contact being called.)"""
    return Campaign.status.in_(states.ACTIVE) & or_(
        (Campaign.status == states.SCHEDULED) & (Campaign.start_at <= now),
        (Campaign.status == states.RUNNING) & (_contact_due(now).exists() | _requeued_call_due().exists()),
    )


def _attempts_ended() -> Select[tuple[int]]:
    """Contacts being called whose call has ended: their result is settled next."""
    return (
        select(CampaignContact.id)
        .join(Call, Call.id == CampaignContact.last_call_id)
        .where(CampaignContact.state == states.CALLING, Call.status.in_(statuses.TERMINAL))
    )


def campaign_work_due_query(
    user_id: uuid.UUID | BindParameter[uuid.UUID], now: datetime | BindParameter[datetime]
) -> Select[tuple[uuid.UUID]]:
    """The user's campaigns with a call to place at `now` (so a wake-up for a campaign waiting on its window or its
    retries costs one read and no lock)."""
    return select(Campaign.id).where(Campaign.user_id == user_id, _calls_due(now))


def attempt_ended_query(call_id: uuid.UUID | None | BindParameter[uuid.UUID | None]) -> Select[tuple[int]]:
    """The contact whose attempt `call_id` was, if that call ended and its result awaits settling."""
    return _attempts_ended().where(_attempt_of(call_id))


def _attempt_of(call_id: uuid.UUID | None | BindParameter[uuid.UUID | None]) -> ColumnElement[bool]:
    """The call and the contact it is an attempt of, each by primary key, however many contacts are being called."""
    return (Call.id == call_id) & (CampaignContact.id == Call.contact_id)


def requeued_calls_due_query(user_id: uuid.UUID | BindParameter[uuid.UUID]) -> Select[tuple[uuid.UUID]]:
    """Calls of the user's running campaigns back in the queue and due (a dispatch places them first)."""
    return _requeued_call_due().where(Campaign.user_id == user_id, Campaign.status == states.RUNNING)


def canceled_campaign_calls_query(user_id: uuid.UUID) -> Select[tuple[Call]]:
    """Calls of the user's canceled campaigns that Bolna sent back to the queue after the cancel."""
    return (
        select(Call)
        .join(Campaign, Campaign.id == Call.campaign_id)
        .where(Campaign.user_id == user_id, Campaign.status == states.CANCELED, Call.status == statuses.PENDING)
        .with_for_update(of=Call, key_share=True)
    )


def users_with_campaign_work_query(now: datetime) -> Select[tuple[uuid.UUID]]:
    """Users with campaign work due at `now`: an active campaign with something to do, an attempt of any campaign
    (a paused or canceled one too) awaiting its result, or a call of a canceled campaign back in the queue. The last
    two start from their few rows (contacts being called, calls back in the queue), never from every campaign."""
    owner_of_campaign = select(Campaign.user_id).where(Campaign.id == CampaignContact.campaign_id).scalar_subquery()
    active = select(Campaign.user_id).where(_calls_due(now))
    ended = _attempts_ended().with_only_columns(owner_of_campaign)
    requeued_after_cancel = select(Call.user_id).where(
        Call.status == statuses.PENDING,
        Call.campaign_id.is_not(None),
        select(Campaign.status).where(Campaign.id == Call.campaign_id).scalar_subquery() == states.CANCELED,
    )
    return active.union(ended, requeued_after_cancel)


class CampaignDispatch:
    """Settles finished attempts and picks campaign calls for free slots; the caller holds the user's lock."""

    def __init__(self, clock: Clock = system_clock):
        self.clock = clock

    def settle(self, uow: UnitOfWork, user_id: uuid.UUID, call_id: uuid.UUID | None = None) -> None:
        """Gives each contact whose call ended (or only `call_id`'s) its result, or a retry per its campaign's
        policy, and completes the campaigns with nothing left to call."""
        now = self.clock()
        touched: dict[uuid.UUID, Campaign] = {}
        for contact, call in uow.session.execute(finished_attempts_query(user_id, call_id)).all():
            campaign = touched.get(contact.campaign_id) or uow.session.get_one(Campaign, contact.campaign_id)
            touched[campaign.id] = campaign
            if _retries(campaign, contact, call):
                contact.state = states.WAITING
                contact.next_attempt_at = now + campaign.retry_delay(contact.attempts)
            else:
                contact.state = states.DONE
                contact.final_status = call.status
        for campaign in touched.values():
            self.finish_if_done(uow, campaign)

    def cancel_requeued(self, uow: UnitOfWork, user_id: uuid.UUID) -> None:
        """Cancels the calls Bolna sent back to the queue after their campaign was canceled (the scheduler's round;
        a dispatch never picks them, so they wait for it harmlessly)."""
        for call in uow.session.scalars(canceled_campaign_calls_query(user_id)):
            lifecycle.cancel_queued(call, "The campaign was canceled before the call was placed.")

    def finish_if_done(self, uow: UnitOfWork, campaign: Campaign) -> None:
        if campaign.status not in (states.RUNNING, states.PAUSED):
            return
        if uow.session.scalar(has_open_contacts_query(campaign.id)):
            return
        # Bolna's word overruling a failure reopens a contact without the customer's lock, holding the campaign's row
        # until it commits (`CallStore.reopen_campaign_attempt`): past that lock, the contacts are looked at again.
        uow.session.execute(campaign_lock_query(campaign.id))
        if uow.session.scalar(has_open_contacts_query(campaign.id)):
            return
        campaign.status = states.COMPLETED
        campaign.pause_reason = None
        campaign.finished_at = func.now()

    def pause_for_credits(self, uow: UnitOfWork, user_id: uuid.UUID) -> None:
        """The customer ran out of credits: their campaigns stop until the customer resumes them."""
        for campaign in uow.session.scalars(running_campaigns_query(user_id)):
            campaign.status = states.PAUSED
            campaign.pause_reason = states.PAUSED_NO_CREDITS

    def pick(self, uow: UnitOfWork, user: User, free: int, requeued: bool = True) -> list[Call]:
        """Up to `free` campaign calls to place now, shared round robin between the user's running campaigns, each
        within its `maxConcurrency`; new calls are added to the session (still `pending`: the caller reserves)."""
        now = self.clock()
        picked: list[Call] = []
        rotation: list[_CampaignTurn] = []
        campaigns = list(uow.session.scalars(running_campaigns_query(user.id)))
        # Turns are ordered by when each campaign was last served; they only move forward, even on a clock that
        # stands still within a burst.
        last_turn = max((c.last_dispatched_at for c in campaigns if c.last_dispatched_at is not None), default=now)
        turn_base = max(now, last_turn)
        for campaign in campaigns:
            if campaign.status == states.SCHEDULED:
                if campaign.start_at is not None and campaign.start_at > now:
                    continue
                campaign.status = states.RUNNING
                campaign.started_at = func.now()
            room = free
            if campaign.max_concurrency is not None:
                room = campaign.max_concurrency - (uow.session.scalar(held_by_campaign_query(campaign.id)) or 0)
            if room > 0:
                rotation.append(_CampaignTurn(uow, campaign, room, now, requeued))
        served = 0
        shared = len(campaigns) > 1  # turns matter only between campaigns (one at its cap now included)
        while len(picked) < free and rotation:
            for turn in list(rotation):
                if len(picked) >= free:
                    break
                call = turn.next_call(free - len(picked))
                if call is None:
                    rotation.remove(turn)
                    if turn.exhausted:
                        self.finish_if_done(uow, turn.campaign)
                    continue
                picked.append(call)
                served += 1
                if shared:  # served in this order: the next free slot goes to the one served longest ago
                    turn.campaign.last_dispatched_at = turn_base + timedelta(microseconds=served)
        return picked


def _retries(campaign: Campaign, contact: CampaignContact, call: Call) -> bool:
    """Another attempt follows Bolna's word on the call (a status the policy lists), never a
    failure of Callflow's own (a refused request, an outcome it could not confirm): those could dial twice."""
    return (
        campaign.status not in states.FINISHED
        and call.error_type is None
        and call.status in campaign.retry_on_statuses
        and contact.attempts < campaign.retry_max_attempts
    )


class _CampaignTurn:
    """One campaign's place in the rotation: what it may still take, and its next candidates."""

    def __init__(self, uow: UnitOfWork, campaign: Campaign, room: int, now: datetime, requeued: bool):
        self._uow, self.campaign, self._room, self._now = uow, campaign, room, now
        self._window = CallingWindow.of(campaign)
        self._queued: list[Call] | None = None if requeued else []  # [] when none is due: not read at all
        self._contacts: list[CampaignContact] = []
        self._read = 0
        self.exhausted = False  # no contact is due now (as opposed to the campaign's cap being reached)

    def next_call(self, wanted: int) -> Call | None:
        if self._room <= 0:
            return None
        call = self._next_queued_call() or self._next_contact_call(wanted)
        if call is not None:
            self._room -= 1
        return call

    def _next_queued_call(self) -> Call | None:
        """A call Bolna sent back to the queue (a 429, the breaker): it keeps to the calling window too."""
        if self._queued is None:
            self._queued = list(self._uow.session.scalars(queued_campaign_calls_query(self.campaign.id, self._room)))
        while self._queued:
            call = self._queued.pop(0)
            opening = self._opening_for(call.phone_number)
            if opening is None:
                return call
            call.next_attempt_at = opening
        return None

    def _next_contact_call(self, wanted: int) -> Call | None:
        while self._read < MAX_CONTACTS_READ_PER_TURN:
            if not self._contacts:
                # Without a window every contact read is called: read (and lock) only those wanted.
                size = wanted if self._window is None else max(wanted, CONTACT_BATCH)
                batch = due_contacts_query(self.campaign.id, self._now, size)
                self._contacts = list(self._uow.session.scalars(batch))
                if not self._contacts:
                    self.exhausted = True
                    return None
            contact = self._contacts.pop(0)
            self._read += 1
            opening = self._opening_for(contact.phone_number)
            if opening is not None:
                contact.next_attempt_at = opening
                contact.waiting_for_window = True
                continue
            return self._call_for(contact)
        return None  # the next dispatch, or the scheduler's next round, reads on

    def _opening_for(self, phone_number: str) -> datetime | None:
        """None while the number's calling window is open, else when it opens next."""
        if self._window is None:
            return None
        opening = self._window.next_opening(phone_number, self._now)
        return opening if opening > self._now else None

    def _call_for(self, contact: CampaignContact) -> Call:
        campaign = self.campaign
        metadata = dict(contact.variables)
        if contact.name:
            metadata.setdefault("name", contact.name)
        call = Call(
            id=uuid.uuid4(),
            user_id=campaign.user_id,
            agent_id=campaign.agent_id,
            phone_number=contact.phone_number,
            call_metadata=metadata,
            status=statuses.PENDING,
            trace_headers=campaign.trace_headers,
            campaign_id=campaign.id,
            contact_id=contact.id,
        )
        contact.state = states.CALLING
        contact.attempts += 1
        contact.last_call_id = call.id
        contact.waiting_for_window = False
        return call
