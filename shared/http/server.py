"""Runs a Flask app factory under gunicorn: the production server of every HTTP service."""

from __future__ import annotations

from collections.abc import Callable

import sentry_sdk
from flask import Flask
from gunicorn.app.base import BaseApplication

from shared.core.config import Settings

FLUSH_SECONDS = 5.0


def _flush_sentry(server: object, worker: object) -> None:
    """On SIGTERM a worker finishes its requests, then sends what Sentry still holds before it exits."""
    sentry_sdk.flush(timeout=FLUSH_SECONDS)


class _Gunicorn(BaseApplication):
    def __init__(self, factory: Callable[[], Flask], options: dict[str, object]):
        self._factory = factory
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        # Called in each worker after fork, so connections and pools are never shared across processes.
        return self._factory()


def run_http(
    factory: Callable[[], Flask],
    *,
    host: str,
    port: int,
    workers: int,
    threads: int,
    graceful_timeout: int = 30,
    keepalive_seconds: int = 2,
) -> None:
    _Gunicorn(
        factory,
        {
            "bind": f"{host}:{port}",
            "workers": workers,
            "threads": threads,
            "worker_class": "gthread",
            "timeout": 60,
            "graceful_timeout": graceful_timeout,
            "keepalive": keepalive_seconds,
            "errorlog": "-",
            "loglevel": "info",
            "control_socket_disable": True,  # several services share a host: no shared control socket path
            "worker_exit": _flush_sentry,
        },
    ).run()


def serve(factory: Callable[[], Flask], settings: Settings, default_port: int) -> None:
    """Serves an HTTP service on HOST:PORT with the configured worker processes and threads."""
    run_http(
        factory,
        host=settings.host,
        port=settings.port or default_port,
        workers=settings.web_concurrency,
        threads=settings.web_threads,
    )
