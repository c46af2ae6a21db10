"""`make up` from a clean clone brings all four processes (and the local Bugsink) to healthy; Ctrl-C stops all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import WEBHOOK_SECRET
from tests.support.isolation import POSTGRES_ADMIN_URL, Isolation
from tests.support.processes import REPO, free_port

PORTS = {"call-initiator": 8001, "webhook-receiver": 8002, "queue-processor": 8003, "bolna-simulator": 8010}
# What services/queue_processor/retention.py logs for each step of a run.
JOB_ROUND_DONE = re.compile(rb"queue-processor\.\d+ +\|.* retention: \w+ touched \d+ rows")


def _healthy(port: int) -> bool:
    return _answers(f"http://127.0.0.1:{port}/health")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def fresh_database(isolation: Isolation):
    """A database that does not exist yet: `make up` must create it."""
    name = f"{isolation.name}_up"
    yield isolation.database_url.rsplit("/", 1)[0] + f"/{name}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.mark.timeout(900)  # a clone, a cold install of Bugsink, then up to 600 s for everything to be healthy
def test_make_up_from_a_clean_clone(tmp_path, isolation, fresh_database):
    busy = [name for name, port in PORTS.items() if _healthy(port)]
    assert not busy, f"ports of {busy} are already serving; stop the running stack first"

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    bugsink_port = free_port()
    (clone / ".env").write_text(
        f"DATABASE_URL={fresh_database}\nRABBITMQ_URL={isolation.rabbitmq_url}\n"
        f"WEBHOOK_SECRET={WEBHOOK_SECRET}\nBOLNA_API_KEY=dev-bolna-key\n"
        f"SENTRY_SEND_IN_DEVELOPMENT=true\nBUGSINK_PORT={bugsink_port}\n"
    )
    bugsink_ready = f"http://127.0.0.1:{bugsink_port}/health/ready"
    log_path = tmp_path / "make-up.log"
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "RABBITMQ_URL")}
    with log_path.open("wb") as log:
        make = subprocess.Popen(
            ["make", "up"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 600
            while not (all(_healthy(port) for port in PORTS.values()) and _answers(bugsink_ready)):
                assert make.poll() is None, f"make up exited early:\n{log_path.read_text()[-4000:]}"
                assert time.monotonic() < deadline, f"not all healthy in time:\n{log_path.read_text()[-4000:]}"
                time.sleep(1)
            health = httpx.get("http://127.0.0.1:8001/health").json()
            assert health["checks"] == {"database": "ok", "rabbitmq": "ok"}
            assert health["sentry"]["enabled"] is True, "make up points the services at its Bugsink"
            # Enforcing retention is the last job of the queue-processor's first round, and logs each step: once
            # it has, every job has run, and each would have checked in.
            deadline = time.monotonic() + 60
            while not JOB_ROUND_DONE.search(log_path.read_bytes()):
                assert time.monotonic() < deadline, f"no periodic job ran:\n{log_path.read_text()[-4000:]}"
                time.sleep(1)
            time.sleep(2)  # the SDK sends from a thread of its own: time for a check-in to reach Bugsink's log
            quiet = b"non-supported envelope item: check_in" not in log_path.read_bytes()
            assert quiet, "make up sends its Bugsink no Crons check-ins, which it could only log as unsupported"
        finally:
            os.killpg(make.pid, signal.SIGINT)
            try:
                make.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(make.pid, signal.SIGKILL)
                make.wait(10)
    assert not any(_healthy(port) for port in PORTS.values()), "Ctrl-C must stop every process"
    assert not _answers(bugsink_ready), "Ctrl-C must stop Bugsink too"
