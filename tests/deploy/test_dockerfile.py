"""deploy/Dockerfile and the server it runs: the image lints clean, runs as a numeric non-root user with an exec-form
command, is built from what the build context holds; gunicorn runs with shared/http/gunicorn_config.py (workers from
the CPUs given, apps built after the fork, the request id in the access log)."""

from __future__ import annotations

import gc
import importlib.util
import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.bolna_simulator.__main__ import main as simulator_main
from shared.core.config import Settings
from shared.http import gunicorn_config, server
from shared.http.gunicorn_config import available_cpus, default_workers
from tests.support.processes import REPO, free_port, stop_process
from tests.support.stack import wait_until

DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
VENV_BIN = Path(sys.executable).parent


def _stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined, comments dropped), split into build stages."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    instructions = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    stages: list[list[str]] = []
    for instruction in instructions:
        if instruction.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _arguments(stage: list[str], keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in stage if line.split(None, 1)[0].upper() == keyword]


def test_hadolint_passes():
    result = subprocess.run(
        [str(VENV_BIN / "hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_runtime_stage_installs_only_the_builders_wheels():
    stages = _stages()
    assert len(stages) >= 2, "no separate build stage"
    runtime = " ".join(stages[-1])
    assert "pip install --no-index" in runtime, "the runtime stage installs from an index, not the builder's wheels"
    assert not re.search(r"\[dev\]|requirements-dev|pytest", DOCKERFILE.read_text()), "dev dependencies in the image"


def test_the_image_runs_as_a_numeric_non_root_user_with_an_exec_form_command():
    runtime = _stages()[-1]
    user = _arguments(runtime, "USER")[-1]
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user} is not numeric"
    assert int(user.split(":")[0]) != 0, "the image runs as root"
    command = json.loads(_arguments(runtime, "CMD")[-1])  # exec form is a JSON array; shell form fails here
    assert command[:2] == ["python", "-m"] and importlib.util.find_spec(command[2]), command


def test_an_image_built_as_documented_carries_its_commit_as_the_release():
    runtime = _stages()[-1]
    assert "GIT_SHA" in [arg.split("=")[0] for arg in _arguments(runtime, "ARG")]
    assert "SENTRY_RELEASE=$GIT_SHA" in _arguments(runtime, "ENV")
    documented = re.findall(r"docker build [^`\n]*", (REPO / "README.md").read_text() + DOCKERFILE.read_text())
    assert documented, "no documented docker build command"
    for command in documented:  # without the argument, the image's SENTRY_RELEASE is empty
        assert "--build-arg GIT_SHA=$(git rev-parse HEAD)" in command, command


def test_every_file_the_dockerfile_copies_is_in_the_build_context():
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    assert "*" in lines, ".dockerignore does not leave everything out first (an allow-list)"
    kept = {line[1:] for line in lines if line.startswith("!")}
    for stage in _stages():
        for copy in _arguments(stage, "COPY"):
            if copy.startswith("--from"):
                continue
            *sources, _destination = copy.split()
            missing = [source for source in sources if source.rstrip("/") not in kept]
            assert not missing, f"COPY {copy}: {missing} left out of the build context by .dockerignore"


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000\n", 2), ("150000 100000\n", 2), ("50000 100000\n", 1), (None, 2)],
    ids=["no-quota", "one-and-a-half-cpus", "half-a-cpu", "no-cgroup-v2"],
)
def test_available_cpus_are_capped_by_the_cgroup_quota(tmp_path, monkeypatch, cpu_max, expected):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    assert available_cpus(path) == expected


def test_workers_default_to_the_cpus_unless_web_concurrency_is_set(monkeypatch):
    started: list[dict[str, object]] = []
    monkeypatch.setattr(server, "run_http", lambda factory, **options: started.append(options))
    monkeypatch.setattr(server, "available_cpus", lambda: 3)
    server.serve(lambda: None, Settings(web_concurrency=None), default_port=8001)
    server.serve(lambda: None, Settings(web_concurrency=5), default_port=8001)
    assert [options["workers"] for options in started] == [default_workers(3), 5] == [3, 5]
    assert default_workers(1) == 2  # a worker being replaced never leaves the service without one


PROBE_APP = """
import os, sys
from flask import Flask, request
from shared.http.server import run_http

def create_app():
    built_by = os.getpid()
    app = Flask("probe")

    @app.get("/")
    def pids():
        body = {"built_by": built_by, "served_by": os.getpid()}
        return body, 200, {"X-Request-ID": request.headers["X-Request-ID"]}

    return app

run_http(create_app, host="127.0.0.1", port=int(sys.argv[1]), workers=2, threads=2)
"""


@pytest.mark.timeout(90)
def test_gunicorn_builds_the_app_in_each_worker_and_logs_the_request_id(tmp_path):
    script, log, port = tmp_path / "probe.py", tmp_path / "probe.log", free_port()
    script.write_text(PROBE_APP)
    with log.open("wb") as out:
        master = subprocess.Popen(
            [sys.executable, str(script), str(port)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
    try:

        def answer() -> httpx.Response | None:
            assert master.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/", headers={"X-Request-ID": "probe-7f3a"}, timeout=5)
            except httpx.HTTPError:
                return None

        pids = wait_until(answer, 45, "the probe app answers").json()
        # A request is always served by a worker: what tells a preloaded app apart is the process that built it.
        assert pids["built_by"] == pids["served_by"] != master.pid, f"master {master.pid}, app {pids}"
    finally:
        code = stop_process(master, signal.SIGTERM)
    output = log.read_text()
    assert code == 0, output
    assert output.count("Booting worker") == 2 and "Using worker: shared.http.worker.ProblemThreadWorker" in output
    assert '"GET / HTTP/1.1" 200' in output and "request_id=probe-7f3a" in output, output


def test_every_setting_of_the_config_module_reaches_gunicorn():
    application = server._Gunicorn(lambda: None, {"workers": 3, "threads": 4, "bind": "127.0.0.1:1", "keepalive": 9})
    names = [name for name in vars(gunicorn_config) if name in application.cfg.settings]
    assert {"worker_class", "graceful_timeout", "max_requests", "max_requests_jitter", "access_log_format"} <= set(
        names
    )
    for name in names:
        if name not in ("worker_class", "keepalive"):
            assert getattr(application.cfg, name) == getattr(gunicorn_config, name), name
    assert application.cfg.worker_class_str == "shared.http.worker.ProblemThreadWorker"
    assert (application.cfg.workers, application.cfg.threads, application.cfg.keepalive) == (3, 4, 9)


def test_a_worker_leaves_what_its_app_factory_built_out_of_the_garbage_collectors_walks():
    """A full collection would otherwise walk every object the app holds for its whole life, all request threads
    waiting (shared.core.heap.freeze_startup_heap). gunicorn calls post_worker_init right after the worker's load()."""
    application = server._Gunicorn(lambda: {"routes": ["/webhooks/bolna"]}, {"bind": "127.0.0.1:1"})
    built = application.load()
    assert any(tracked is built for tracked in gc.get_objects())  # a container the collector walks
    application.cfg.post_worker_init(None)
    try:
        assert not any(tracked is built for tracked in gc.get_objects())
    finally:
        gc.unfreeze()


def _served_settings(monkeypatch: pytest.MonkeyPatch, serve: Callable[[], None]) -> Any:
    """The gunicorn settings `serve` would start the server with (it is not started)."""
    started: list[Any] = []
    monkeypatch.setattr(server._Gunicorn, "run", lambda application: started.append(application.cfg))
    serve()
    assert len(started) == 1
    return started[0]


def test_the_services_replace_their_workers_and_the_simulator_keeps_its_one(monkeypatch):
    settings = _served_settings(
        monkeypatch, lambda: server.run_http(lambda: None, host="127.0.0.1", port=1, workers=2, threads=2)
    )
    assert settings.max_requests == gunicorn_config.max_requests > 0
    # The simulator's calls, config and record of requests live in its one worker: replacing it would lose them
    # all in the middle of a test run.
    monkeypatch.setenv("PORT", "1")
    settings = _served_settings(monkeypatch, simulator_main)
    assert (settings.workers, settings.max_requests, settings.keepalive) == (1, 0, 75)
