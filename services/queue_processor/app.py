"""The queue-processor process: a health endpoint, the dispatch-queue consumer and the periodic jobs."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass

import sentry_sdk
from flask import Flask
from werkzeug.serving import make_server

from services.queue_processor.consumer import CONSUMER_PLACE, Consumer
from services.queue_processor.dispatch import Dispatcher
from services.queue_processor.jobs import PeriodicJobs, job_threads
from shared.core.config import Settings
from shared.core.errors import CallflowError, ErrorType
from shared.messaging.outbox import AfterCommitPublisher
from shared.observability.sentry import report

SERVICE = "queue-processor"
DEFAULT_HEALTH_PORT = 8003
STOP_TIMEOUT_SECONDS = 10.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueProcessor:
    """What the composition root hands the process: its health app, its consumer and its jobs."""

    settings: Settings
    health_app: Flask
    consumer: Consumer
    jobs: PeriodicJobs
    dispatcher: Dispatcher
    after_commit: AfterCommitPublisher
    stopping: threading.Event

    def run(self) -> None:
        """Runs until SIGTERM or SIGINT, then finishes the message in hand and the calls being placed, publishes
        what they announced, and flushes Sentry."""
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        port = self.settings.port or DEFAULT_HEALTH_PORT
        health = make_server(self.settings.host, port, self.health_app, threaded=True)
        threading.Thread(target=health.serve_forever, name="health", daemon=True).start()
        jobs = job_threads(self.jobs.all(), self.stopping)
        for thread in jobs:
            thread.start()
        log.info("queue-processor started; health on %s:%s", self.settings.host, port)
        try:
            self.consumer.run()  # returns once `stopping` is set and the message in hand is acknowledged
        except BaseException as exc:
            # A consumer that died must take the process with it (a supervisor starts a new one): the jobs alone
            # would keep it alive without consuming, and its placing threads are shut down with the main thread.
            log.exception("the dispatch-queue consumer failed; the queue-processor stops")
            if isinstance(exc, Exception):  # a bug: it may kill every process that takes the same message
                detail = f"The dispatch-queue consumer failed ({type(exc).__name__}); the queue-processor stops."
                report(CallflowError(ErrorType.INTERNAL_ERROR, detail), cause=exc, place=CONSUMER_PLACE)
            self.stopping.set()
            raise
        finally:
            for thread in jobs:
                thread.join()
        if not self.dispatcher.wait_until_idle(STOP_TIMEOUT_SECONDS):
            log.warning("calls are still being placed after %.0f s; waiting for Bolna's answers", STOP_TIMEOUT_SECONDS)
        self.after_commit.wait_until_idle(STOP_TIMEOUT_SECONDS)  # what is left, the relay publishes
        health.shutdown()
        sentry_sdk.flush(timeout=5)
        log.info("queue-processor stopped")
