"""How long a service may take to stop once it gets SIGTERM, from the code's own timeouts. A stop grace period
(compose's `stop_grace_period`, a pod's `terminationGracePeriodSeconds`) must be longer, or the service is killed
mid-stop."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from unittest import mock

from flask import Flask

from services.queue_processor import app as queue_processor
from shared.core.config import Settings
from shared.http import gunicorn_config


def http_stop_seconds(pre_stop_seconds: float = 0.0) -> float:
    """A gunicorn service: the preStop pause (the pod leaves the Service's endpoints first), the requests in
    progress (graceful_timeout), then each worker's Sentry flush (worker_exit). An upper bound: gunicorn's master
    kills a worker still flushing once graceful_timeout has passed."""
    return pre_stop_seconds + gunicorn_config.graceful_timeout + gunicorn_config.FLUSH_SECONDS


def queue_processor_stop_seconds(settings: Settings, pre_stop_seconds: float = 0.0) -> float:
    """The queue-processor: the message in hand, then every wait `QueueProcessor.run` makes once its consumer
    returns, as it makes them (each timeout it passes to the dispatcher, the after-commit publisher and Sentry).

    The message in hand waits on at most one Bolna request (an execution stop; placing calls goes to the
    dispatcher's threads), bounded by the client's connect and read timeouts."""
    message_in_hand = settings.bolna_connect_timeout_seconds + settings.bolna_timeout_seconds
    return pre_stop_seconds + message_in_hand + sum(_waits_after_the_consumer(settings))


def _waits_after_the_consumer(settings: Settings) -> list[float]:
    """The timeouts `QueueProcessor.run` waits out after its consumer returns, each waited in full (nothing goes
    idle), with no server, thread or signal handler of its own left behind."""
    waits: list[float] = []

    def waited(timeout: float) -> bool:
        waits.append(timeout)
        return False

    never_idle = SimpleNamespace(wait_until_idle=waited)
    server = SimpleNamespace(serve_forever=lambda: None, shutdown=lambda: None)
    process = queue_processor.QueueProcessor(
        settings=settings,
        health_app=Flask("health"),
        consumer=SimpleNamespace(run=lambda: None),  # as when SIGTERM came and the message in hand was settled
        jobs=SimpleNamespace(all=lambda: ()),
        dispatcher=never_idle,
        after_commit=never_idle,
        stopping=threading.Event(),
    )
    with (
        mock.patch.object(queue_processor.signal, "signal"),
        mock.patch.object(queue_processor, "make_server", return_value=server),
        mock.patch.object(queue_processor, "job_threads", return_value=[]),
        mock.patch.object(queue_processor.sentry_sdk, "flush", side_effect=lambda timeout: waits.append(timeout)),
    ):
        process.run()
    return waits
