"""The queue-processor never lives on without its consumer: a broker connection pika lost is lost like any other,
and a consumer that fails anyway stops the whole process, so its supervisor starts a new one."""

from __future__ import annotations

import signal
import threading
from types import SimpleNamespace

import pytest
from flask import Flask

from services.queue_processor import app
from services.queue_processor.app import QueueProcessor
from services.queue_processor.consumer import ConnectionLost, Consumer, process_events
from services.queue_processor.jobs import Job
from shared.core.errors import ErrorType
from shared.messaging.topology import BROKER_AWAY, declare_topology_at
from tests.support.processes import free_port
from tests.support.slow_broker import BlackHoleBroker
from tests.support.stack import wait_until


class _Connection:
    """A pika connection whose I/O loop pika closed (the connection was lost), or one still open."""

    def __init__(self, is_open: bool):
        self.is_open = is_open

    def process_data_events(self, time_limit: float) -> None:
        raise ValueError("Timeout closed before call")


def test_a_lost_connection_whose_io_loop_pika_closed_is_a_lost_connection():
    with pytest.raises(ConnectionLost):
        process_events(_Connection(is_open=False))  # type: ignore[arg-type]


def test_the_same_error_on_an_open_connection_is_not_taken_for_a_lost_one():
    with pytest.raises(ValueError, match="Timeout closed before call"):
        process_events(_Connection(is_open=True))  # type: ignore[arg-type]


class _FailingConsumer:
    def run(self) -> None:
        raise RuntimeError("the consumer broke")


def test_a_consumer_that_fails_stops_the_periodic_jobs_and_the_process(monkeypatch):
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # the test runner keeps its own handlers
    rounds = threading.Event()
    jobs = SimpleNamespace(all=lambda: (Job(rounds.set, interval_seconds=0.05),))
    stopping = threading.Event()
    processor = QueueProcessor(
        settings=SimpleNamespace(host="127.0.0.1", port=free_port()),  # type: ignore[arg-type]
        health_app=Flask(__name__),
        consumer=_FailingConsumer(),  # type: ignore[arg-type]
        jobs=jobs,  # type: ignore[arg-type]
        dispatcher=None,  # type: ignore[arg-type]
        after_commit=None,  # type: ignore[arg-type]
        stopping=stopping,
    )

    reported: list[tuple[str | None, str]] = []
    monkeypatch.setattr(app, "report", lambda error, cause=None, place=None: reported.append((place, error.error_type)))

    with pytest.raises(RuntimeError, match="the consumer broke"):
        processor.run()
    assert stopping.is_set()
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("periodic-jobs")]
    assert reported == [("broker.consume", ErrorType.INTERNAL_ERROR)], "its death is an event with its error_type"


def test_a_broker_that_takes_the_connection_and_never_answers_is_an_outage_the_consumer_waits_out(caplog):
    stopping = threading.Event()
    failures: list[BaseException] = []

    def consume(url: str) -> None:
        try:
            Consumer(url, "callflow.dispatch", lambda _: None, prefetch=1, stopping=stopping).run()
        except BaseException as exc:
            failures.append(exc)

    with BlackHoleBroker() as broker:
        url = f"{broker.url}?stack_timeout=0.5"  # pika gives up on the handshake after this (15 s by default)
        consumer = threading.Thread(target=consume, args=(url,))
        consumer.start()
        wait_until(lambda: _reconnects(caplog) >= 2 or not consumer.is_alive(), 30, "the handshake timed out twice")
        assert consumer.is_alive() and not failures, failures
        stopping.set()
        consumer.join(10)
    assert not consumer.is_alive() and not failures, failures
    with BlackHoleBroker() as broker, pytest.raises(BROKER_AWAY):
        declare_topology_at(f"{broker.url}?stack_timeout=0.5")  # what start_service catches as BROKER_AWAY


def _reconnects(caplog: pytest.LogCaptureFixture) -> int:
    return sum("broker unreachable" in record.getMessage() for record in caplog.records)
