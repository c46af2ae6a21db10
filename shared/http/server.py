"""Runs a Flask app factory under gunicorn, with the settings of `shared.http.gunicorn_config`: the production server
of every HTTP service."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask
from gunicorn.app.base import BaseApplication

from shared.core.config import Settings
from shared.http import gunicorn_config
from shared.http.gunicorn_config import available_cpus, default_workers

__all__ = ["run_http", "serve"]


class _Gunicorn(BaseApplication):
    def __init__(self, factory: Callable[[], Flask], options: dict[str, object]):
        self._factory = factory
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        shared_settings = {key: value for key, value in vars(gunicorn_config).items() if key in self.cfg.settings}
        for key, value in {**shared_settings, **self._options}.items():
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
    keepalive_seconds: int = gunicorn_config.keepalive,
    recycle_workers: bool = True,
) -> None:
    """Serves the app the factory builds (once in each worker) with gunicorn_config's settings and these.
    `recycle_workers=False` keeps each worker for the life of the server: for an app whose state lives in memory."""
    options: dict[str, object] = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "threads": threads,
        "keepalive": keepalive_seconds,
    }
    if not recycle_workers:
        options["max_requests"] = 0  # gunicorn's "never replace a worker for its request count"
    _Gunicorn(factory, options).run()


def serve(factory: Callable[[], Flask], settings: Settings, default_port: int) -> None:
    """Serves an HTTP service on HOST:PORT with WEB_CONCURRENCY workers (default: one per available CPU) of
    WEB_THREADS threads."""
    run_http(
        factory,
        host=settings.host,
        port=settings.port or default_port,
        workers=settings.web_concurrency or default_workers(available_cpus()),
        threads=settings.web_threads,
    )
