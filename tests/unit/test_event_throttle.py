"""The throttle of unauthenticated errors, on a fake clock: what becomes an event, what is only counted, and how
much it remembers; and FirstTimes, which lets a cause that comes with every call be reported once."""

import ipaddress

from shared.observability.sentry import EventThrottle, FirstTimes

AUTH_FAILED = "webhook_auth_failed"
FORBIDDEN = "webhook_source_forbidden"


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_event_per_type_and_source_per_window_the_rest_counted_on_the_next():
    clock = _Clock()
    throttle = EventThrottle(window_seconds=60, per_type=10, clock=clock)
    assert throttle.admit(AUTH_FAILED, "203.0.113.7") == {"since_last_event": 0, "since_start": 0}
    assert [throttle.admit(AUTH_FAILED, "203.0.113.7") for _ in range(5)] == [None] * 5
    assert throttle.admit(FORBIDDEN, "203.0.113.7") == {"since_last_event": 0, "since_start": 0}, "another type"
    clock.now += 59
    assert throttle.admit(AUTH_FAILED, "203.0.113.7") is None
    clock.now += 2
    assert throttle.admit(AUTH_FAILED, "203.0.113.7") == {"since_last_event": 6, "since_start": 6}
    assert throttle.admit(AUTH_FAILED, "203.0.113.8") == {"since_last_event": 0, "since_start": 6}


def test_rotating_addresses_are_capped_per_type_and_memory_stays_bounded():
    clock = _Clock()
    throttle = EventThrottle(window_seconds=60, per_type=10, clock=clock)
    first = ipaddress.ip_address("198.18.0.0")
    for window in range(3):
        admitted = [throttle.admit(AUTH_FAILED, str(first + window * 10_000 + n)) for n in range(10_000)]
        assert sum(counts is not None for counts in admitted) == 10, window
        assert throttle.remembered == 10
        clock.now += 61


def test_first_times_says_first_once_per_key_and_nothing_past_its_bound():
    seen = FirstTimes(limit=2)
    assert [seen.first(key) for key in ("a", "a", "b", "c", "b")] == [True, False, True, False, False]
