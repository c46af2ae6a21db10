"""Benchmark of the call path: `POST /api/calls` against a baseline measured in the same run.

The baseline is `GET /health` on the same service (a request that touches PostgreSQL and RabbitMQ once each),
so the printed ratios say what the call path costs on top of serving a request, whatever the machine's speed.
Run with `make bench`; it uses its own database and vhost, like the tests.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROUNDS = 200
BENCH_ENV = {"SENTRY_TRACES_SAMPLE_RATE": "0.2"}  # the production default: tracing every request costs ~10 ms


def _timed(request: Callable[[], httpx.Response], expected: set[int]) -> list[float]:
    samples = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        answer = request()
        samples.append(time.perf_counter() - started)
        assert answer.status_code in expected, answer.text
    return samples


def _summary(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples), statistics.quantiles(samples, n=20)[-1]


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support.isolation import Isolation

    isolation = Isolation.new()
    os.environ.update(DATABASE_URL=isolation.database_url, RABBITMQ_URL=isolation.rabbitmq_url)
    os.environ.setdefault("WEBHOOK_SECRET", "bench-webhook-secret")
    isolation.create()
    try:
        _run()
    finally:
        from tests.support.components import components

        components().engine.dispose()
        isolation.destroy()


def _run() -> None:
    from rich.console import Console
    from rich.table import Table

    from shared.core import migrate
    from tests.support.factories import customer
    from tests.support.sentry_sink import SentrySink
    from tests.support.stack import FAST_CALLS, running_stack

    migrate.upgrade(os.environ["DATABASE_URL"])
    sink = SentrySink().start()
    with tempfile.TemporaryDirectory() as logs, running_stack(sink, Path(logs), BENCH_ENV, FAST_CALLS) as stack:
        placed_owner = customer(credits=1_000_000, max_concurrent_calls=ROUNDS)
        queued_owner = customer(credits=1_000_000, max_concurrent_calls=1)
        http = httpx.Client(timeout=30)

        def place(owner) -> Callable[[], httpx.Response]:
            body = {"agentId": str(owner.agent_id), "phoneNumber": "+14155550123"}
            return lambda: http.post(f"{stack.call_initiator.url}/api/calls", headers=owner.auth, json=body)

        baseline = _timed(lambda: http.get(f"{stack.call_initiator.url}/health"), {200})
        placed = _timed(place(placed_owner), {201})
        queued = _timed(place(queued_owner), {201, 202})
    sink.stop()

    base_median, base_p95 = _summary(baseline)
    table = Table(title=f"call path, {ROUNDS} sequential requests each (ratios against GET /health)")
    for column in ("request", "median ms", "p95 ms", "median ratio", "p95 ratio"):
        table.add_column(column, justify="right" if column != "request" else "left")
    for name, samples in (
        ("GET /health (baseline)", baseline),
        ("POST /api/calls → 201", placed),
        ("POST /api/calls → 202", queued),
    ):
        median, p95 = _summary(samples)
        table.add_row(
            name, f"{median * 1000:.1f}", f"{p95 * 1000:.1f}", f"{median / base_median:.2f}", f"{p95 / base_p95:.2f}"
        )
    Console().print(table)


if __name__ == "__main__":
    main()
