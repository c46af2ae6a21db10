"""The benchmark's arithmetic: runs against one server, taken in turn with other servers' runs, read as one run."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.load import WrkResult


def _run(requests: int, seconds: float, p99_ms: float, statuses: dict[str, int]) -> WrkResult:
    return WrkResult(
        requests=requests,
        seconds=seconds,
        requests_per_second=round(requests / seconds, 1),
        p50_ms=p99_ms / 4,
        p90_ms=p99_ms / 2,
        p99_ms=p99_ms,
        max_ms=p99_ms * 2,
        statuses=statuses,
        socket_errors={"connect": 0, "read": 0, "write": 0, "timeout": 0},
        exhausted=False,
    )


def test_rounds_read_as_one_run_are_their_requests_over_their_time_with_the_highest_of_their_percentiles():
    rounds = [
        _run(800, 2.0, 100.0, {"200": 800}),
        _run(400, 4.0, 300.0, {"200": 399, "500": 1}),
        _run(600, 2.0, 120.0, {"200": 600}),
    ]

    taken = WrkResult.of_rounds(rounds)

    assert (taken.requests, taken.seconds) == (1800, 8.0)
    assert taken.requests_per_second == 225.0  # not the mean of the rounds' rates (266.7): a short run weighs less
    # The pooled p99 cannot exceed the slowest round's: a median of the rounds' (120 ms) would hide that round.
    assert (taken.p50_ms, taken.p90_ms, taken.p99_ms) == (75.0, 150.0, 300.0)
    assert taken.max_ms == 600.0
    assert taken.statuses == {"200": 1799, "500": 1}
    assert taken.socket_errors == {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    assert taken.rounds == tuple(rounds)
    assert [run["requests"] for run in taken.as_json()["rounds"]] == [800, 400, 600]
    assert "rounds" not in rounds[0].as_json()  # a single run says nothing of rounds


def test_rounds_read_as_one_run_use_the_cpu_of_all_of_them_per_request_or_none_when_one_was_not_measured():
    measured = [
        replace(_run(800, 2.0, 100.0, {"200": 800}), cpu_seconds=2.0),
        replace(_run(400, 4.0, 300.0, {"200": 400}), cpu_seconds=1.6),
    ]

    taken = WrkResult.of_rounds(measured)

    assert taken.cpu_seconds == pytest.approx(3.6)
    assert taken.cpu_ms_per_request == pytest.approx(3.0)  # 3.6 s over 1,200 requests, not the mean of 2.5 and 4 ms
    assert taken.as_json()["cpu_ms_per_request"] == 3.0
    assert [run["cpu_ms_per_request"] for run in taken.as_json()["rounds"]] == [2.5, 4.0]
    unmeasured = WrkResult.of_rounds([*measured, _run(600, 2.0, 120.0, {"200": 600})])
    assert unmeasured.cpu_ms_per_request is None and "cpu_seconds" not in unmeasured.as_json()
