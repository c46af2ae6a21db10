"""`python -m services.bolna_simulator`: serves the simulator under gunicorn on $HOST:$PORT."""

from __future__ import annotations

import logging
import os

from pydantic import ValidationError

from services.bolna_simulator.api import create_app
from services.bolna_simulator.config import SimulatorConfig
from shared.http.server import run_http


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # Read once here so a bad SIM_* value stops the start with a clear message, not a worker crash loop.
        config = SimulatorConfig()
    except ValidationError as exc:
        raise SystemExit(f"bolna-simulator: invalid SIM_* configuration: {exc}") from exc
    # One worker: calls, lines and counters live in this process's memory.
    run_http(
        lambda: create_app(config),
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8010")),
        workers=1,
        threads=32,
        # Like an API behind a load balancer: an idle connection stays open for a minute. With gunicorn's 2 s, a
        # client reusing a connection as the server closes it gets a reset, which a POST /call must read as
        # "Bolna may have the call".
        keepalive_seconds=75,
        # A replaced worker would forget every call, its config and its record of requests: a test run sends the
        # simulator more requests than gunicorn_config's max_requests.
        recycle_workers=False,
    )


if __name__ == "__main__":
    main()
