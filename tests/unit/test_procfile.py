"""The Procfile `make up` runs (through honcho, which hands each line to /bin/sh with .env in its environment)."""

from __future__ import annotations

import subprocess

import pytest
from honcho.environ import parse_procfile

from tests.support.processes import REPO

BUGSINK_DSN = "http://key@127.0.0.1:8000/1"
SENTRY_PROJECT_DSN = "https://key@o1.ingest.sentry.io/2"


def _queue_processor_environment(tmp_path, env: dict[str, str]) -> dict[str, str]:
    """The SENTRY_* variables the queue-processor's line starts it with, given .env's values."""
    command = parse_procfile((REPO / "Procfile").read_text()).processes["queue-processor"]
    assert command.endswith(" python -m services.queue_processor"), command
    (tmp_path / ".bugsink").mkdir()
    (tmp_path / ".bugsink" / "dsn").write_text(BUGSINK_DSN)
    shown = command.removesuffix("python -m services.queue_processor") + "env"
    result = subprocess.run(
        shown, shell=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    pairs = (line.split("=", 1) for line in result.stdout.splitlines() if line.startswith("SENTRY_"))
    return dict(pairs)


@pytest.mark.parametrize(
    ("env", "crons", "dsn"),
    [
        ({}, "false", BUGSINK_DSN),
        ({"SENTRY_DSN": "", "SENTRY_CRONS": ""}, "false", BUGSINK_DSN),  # .env.example's values
        ({"SENTRY_DSN": SENTRY_PROJECT_DSN, "SENTRY_CRONS": ""}, "true", SENTRY_PROJECT_DSN),
        ({"SENTRY_DSN": SENTRY_PROJECT_DSN, "SENTRY_CRONS": "false"}, "false", SENTRY_PROJECT_DSN),
        ({"SENTRY_CRONS": "true"}, "true", BUGSINK_DSN),
    ],
    ids=["unset", "empty", "a-sentry-project", "turned-off", "turned-on"],
)
def test_crons_check_in_by_default_only_where_the_dsn_is_not_the_local_bugsink(tmp_path, env, crons, dsn):
    started_with = _queue_processor_environment(tmp_path, env)
    assert (started_with["SENTRY_CRONS"], started_with["SENTRY_DSN"]) == (crons, dsn)
