"""Load generation: wrk runs with the Lua scripts of bench/wrk, and sequential requests timed one by one."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

SCRIPTS = Path(__file__).resolve().parent / "wrk"
CONNECTIONS = 16
THREADS = 2
REQUEST_TIMEOUT = "10s"  # wrk's default of 2 s would turn a slow answer into a socket error, not a latency


class LoadFailure(Exception):
    """A run whose answers were not all the expected ones: its numbers say nothing about the expected path."""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    requests_per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int]
    socket_errors: dict[str, int]
    exhausted: bool
    rounds: tuple[WrkResult, ...] = ()  # the runs this one was taken from (`of_rounds`)
    # CPU the server's processes used for the run (`Bench` reads it from /proc); None: not measured.
    cpu_seconds: float | None = None

    @property
    def cpu_ms_per_request(self) -> float | None:
        return None if self.cpu_seconds is None or not self.requests else self.cpu_seconds * 1000 / self.requests

    def as_json(self) -> dict[str, object]:
        fields = asdict(self)
        if self.rounds:
            fields["rounds"] = [run.as_json() for run in self.rounds]
        else:
            del fields["rounds"]
        cpu_ms = self.cpu_ms_per_request
        if cpu_ms is None:
            del fields["cpu_seconds"]
        else:
            fields["cpu_seconds"] = round(fields["cpu_seconds"], 3)
            fields["cpu_ms_per_request"] = round(cpu_ms, 3)
        return fields

    @classmethod
    def of_rounds(cls, rounds: Sequence[WrkResult]) -> WrkResult:
        """Runs against one server taken as one: their requests over their time, and for each percentile the
        highest of theirs (wrk gives no samples to pool; no more than 1% of all requests can be slower than the
        slowest round's p99, so that is a bound the pooled p99 cannot exceed)."""
        requests, seconds = sum(r.requests for r in rounds), sum(r.seconds for r in rounds)
        cpu = [r.cpu_seconds for r in rounds]
        return cls(
            requests=requests,
            seconds=round(seconds, 3),
            requests_per_second=round(requests / seconds, 1),
            p50_ms=max(r.p50_ms for r in rounds),
            p90_ms=max(r.p90_ms for r in rounds),
            p99_ms=max(r.p99_ms for r in rounds),
            max_ms=max(r.max_ms for r in rounds),
            statuses=_summed([r.statuses for r in rounds]),
            socket_errors=_summed([r.socket_errors for r in rounds]),
            exhausted=any(r.exhausted for r in rounds),
            rounds=tuple(rounds),
            cpu_seconds=None if None in cpu else sum(c for c in cpu if c is not None),
        )


def _summed(counts: Sequence[dict[str, int]]) -> dict[str, int]:
    return {key: sum(count.get(key, 0) for count in counts) for key in sorted({key for c in counts for key in c})}


def wrk(
    script: str,
    url: str,
    args: list[str],
    seconds: float,
    expected: Collection[int],
) -> WrkResult:
    """Runs `bench/wrk/<script>` against `url`; any other answer than `expected`, or any socket error, fails."""
    command = [
        "wrk",
        f"-t{THREADS}",
        f"-c{CONNECTIONS}",
        f"-d{seconds:g}s",
        f"--timeout={REQUEST_TIMEOUT}",
        f"-s{script}",
        url,
        "--",
        *args,
        str(THREADS),
    ]
    # From the scripts' folder, so their `require("report")` finds report.lua.
    finished = subprocess.run(command, cwd=SCRIPTS, capture_output=True, text=True, timeout=seconds + 60)
    lines = [line for line in finished.stdout.splitlines() if line.startswith("{")]
    if finished.returncode != 0 or not lines:
        raise LoadFailure(f"wrk {script} failed ({finished.returncode}): {finished.stderr or finished.stdout}")
    reported = json.loads(lines[-1])
    result = WrkResult(
        **{
            **reported,
            "statuses": dict(sorted(reported["statuses"].items())),
            # wrk counts answers >= 400 as errors too: `statuses` has those.
            "socket_errors": {
                kind: reported["socket_errors"][kind] for kind in ("connect", "read", "write", "timeout")
            },
        }
    )
    unexpected = {status: n for status, n in result.statuses.items() if int(status) not in expected}
    socket_errors = {kind: n for kind, n in result.socket_errors.items() if n}
    if unexpected or socket_errors or result.exhausted or not result.requests:
        raise LoadFailure(
            f"{script} at {url}: {result.requests} requests, unexpected answers {unexpected}, socket errors "
            f"{socket_errors}{', ran out of seeded calls' if result.exhausted else ''}"
        )
    return result


@dataclass(frozen=True)
class Timings:
    """Sequential requests at one connection, in milliseconds."""

    samples: list[float]

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.samples)

    @property
    def p99_ms(self) -> float:
        return statistics.quantiles(self.samples, n=100)[-1]

    @property
    def requests_per_second(self) -> float:
        return len(self.samples) / (sum(self.samples) / 1000)

    def as_json(self) -> dict[str, object]:
        return {
            "requests": len(self.samples),
            "p50_ms": round(self.p50_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "requests_per_second": round(self.requests_per_second, 1),
        }


def alternating(
    first: Callable[[], httpx.Response],
    second: Callable[[], httpx.Response],
    expected: tuple[int, int],
    rounds: int,
    warm_up: int,
) -> tuple[Timings, Timings]:
    """Times `first` and `second` one after the other, `rounds` times, after `warm_up` untimed rounds: alternating
    spreads any drift of the machine over both. An unexpected answer fails the run."""
    samples: tuple[list[float], list[float]] = ([], [])
    for round_number in range(warm_up + rounds):
        for request, status, timed in zip((first, second), expected, samples, strict=True):
            started = time.perf_counter()
            answer = request()
            elapsed_ms = (time.perf_counter() - started) * 1000
            if answer.status_code != status:
                raise LoadFailure(f"{answer.request.method} {answer.request.url}: {answer.status_code} {answer.text}")
            if round_number >= warm_up:
                timed.append(elapsed_ms)
    return Timings(samples[0]), Timings(samples[1])
