import time

from shared.bolna.breaker import CircuitBreaker


def test_opens_after_consecutive_failures_and_lets_one_trial_through_after_the_cooldown():
    breaker = CircuitBreaker(failure_threshold=3, cooldown_seconds=0.2)
    for _ in range(2):
        breaker.record_failure()
    assert breaker.allow() and not breaker.is_open
    breaker.record_failure()
    assert breaker.is_open and not breaker.allow()

    time.sleep(0.25)
    assert breaker.allow(), "half-open: one trial"
    assert not breaker.allow(), "only one trial at a time"
    breaker.record_failure()
    assert breaker.is_open and not breaker.allow(), "a failed trial opens it again"

    time.sleep(0.25)
    assert breaker.allow()
    breaker.record_success()
    assert not breaker.is_open and breaker.allow()


def test_a_success_resets_the_failure_count():
    breaker = CircuitBreaker(failure_threshold=2, cooldown_seconds=10)
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.allow()
