"""The queue-processor: its health app, and the process that runs the consumer and the periodic jobs."""

from __future__ import annotations

import logging
import signal
import threading

import sentry_sdk
from flask import Flask
from werkzeug.serving import make_server

from shared import dispatcher
from shared.config import get_settings
from shared.consumer import Consumer
from shared.messaging import DISPATCH_QUEUE
from shared.web import create_service_app

SERVICE = "queue-processor"
DEFAULT_HEALTH_PORT = 8003

log = logging.getLogger(__name__)


def create_app() -> Flask:
    return create_service_app(SERVICE)


def run() -> None:
    settings = get_settings()
    app = create_app()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())

    health = make_server(settings.host, settings.port or DEFAULT_HEALTH_PORT, app, threaded=True)
    threading.Thread(target=health.serve_forever, name="health", daemon=True).start()

    jobs = threading.Thread(
        target=dispatcher.run_periodically,
        args=(dispatcher.PERIODIC_JOBS, settings.sweep_interval_seconds, stopping),
        name="periodic-jobs",
    )
    jobs.start()
    consumer = Consumer(
        settings.rabbitmq_url,
        DISPATCH_QUEUE,
        dispatcher.handle_dispatch_message,
        settings.rabbitmq_prefetch,
        stopping,
    )
    log.info("queue-processor started; health on %s:%s", settings.host, settings.port or DEFAULT_HEALTH_PORT)
    consumer.run()  # returns once SIGTERM/SIGINT set `stopping` and the message in hand is acknowledged
    jobs.join()
    health.shutdown()
    sentry_sdk.flush(timeout=5)
    log.info("queue-processor stopped")
