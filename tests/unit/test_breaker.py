from shared.bolna.breaker import CircuitBreaker

COOLDOWN = 30.0


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_opens_after_consecutive_failures_and_stays_open_for_the_whole_cooldown():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown_seconds=COOLDOWN, clock=clock)
    for _ in range(2):
        breaker.record_failure()
    assert breaker.allow() and not breaker.is_open
    breaker.record_failure()
    assert breaker.is_open and not breaker.allow()

    clock.advance(COOLDOWN - 0.001)
    assert breaker.is_open and not breaker.allow(), "still cooling down"


def test_after_the_cooldown_one_trial_goes_through_and_a_failed_trial_opens_it_for_another_cooldown():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_seconds=COOLDOWN, clock=clock)
    breaker.record_failure()

    clock.advance(COOLDOWN)
    assert not breaker.is_open, "the cooldown is over"
    assert breaker.allow(), "half-open: one trial"
    assert breaker.is_open and not breaker.allow(), "only one trial at a time"
    clock.advance(COOLDOWN * 10)
    assert not breaker.allow(), "a trial in flight holds the others back however long it takes"

    breaker.record_failure()
    assert breaker.is_open and not breaker.allow(), "a failed trial opens it again"
    clock.advance(COOLDOWN - 0.001)
    assert not breaker.allow(), "a failed trial starts a whole new cooldown"
    clock.advance(0.001)
    assert breaker.allow()


def test_a_successful_trial_closes_it_for_every_request():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, cooldown_seconds=COOLDOWN, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.advance(COOLDOWN)
    assert breaker.allow()
    breaker.record_success()
    assert not breaker.is_open
    assert all(breaker.allow() for _ in range(5)), "closed: no more trials, every request goes"
    breaker.record_failure()
    assert breaker.allow(), "the count started again from zero"


def test_a_success_resets_the_failure_count():
    breaker = CircuitBreaker(failure_threshold=2, cooldown_seconds=COOLDOWN, clock=FakeClock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.allow()


def test_only_the_failure_that_opens_a_closed_breaker_says_so_and_only_closing_an_open_one_says_so():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, cooldown_seconds=COOLDOWN, clock=clock)
    assert [breaker.record_failure() for _ in range(4)] == [False, True, False, False], "opened once"
    clock.advance(COOLDOWN)
    assert breaker.allow()
    assert breaker.record_failure() is False, "a failed trial re-opens it: the same outage"
    clock.advance(COOLDOWN)
    assert breaker.allow()
    assert breaker.record_success() is True, "the outage is over"
    assert breaker.record_success() is False
    assert [breaker.record_failure() for _ in range(2)] == [False, True], "a new outage"
