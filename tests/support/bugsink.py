"""Bugsink, the local Sentry-compatible error tracker of deploy/bugsink/: set it up, serve it, ask its REST API."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.support.processes import REPO, stop_process

SCRIPTS = REPO / "deploy" / "bugsink"
API = "/api/canonical/0"


def setup(state_dir: Path, port: int = 8000, timeout: float = 600.0) -> None:
    """Runs setup.sh into state_dir; the DSN it writes names `port`, the one the server must then serve on."""
    result = subprocess.run(
        ["bash", str(SCRIPTS / "setup.sh"), str(state_dir)],
        env={**os.environ, "BUGSINK_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"setup.sh exited with {result.returncode}:\n{result.stdout}\n{result.stderr[-8000:]}")


def dsn(state_dir: Path) -> str:
    return (state_dir / "dsn").read_text().strip()


def api_token(state_dir: Path) -> str:
    return (state_dir / "api-token").read_text().strip()


class BugsinkServer:
    """run.sh on `port`, as a context manager that waits until Bugsink answers and stops it on the way out."""

    def __init__(self, state_dir: Path, port: int, log_dir: Path):
        self.state_dir = state_dir
        self.port = port
        self.log_path = log_dir / f"bugsink-{port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dsn(self) -> str:
        return dsn(self.state_dir)

    def start(self, timeout: float = 60.0) -> BugsinkServer:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["bash", str(SCRIPTS / "run.sh"), str(self.state_dir)],
                env={**os.environ, "BUGSINK_PORT": str(self.port)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"run.sh exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if self.http.get("/health/ready").status_code == 200:
                    self.http.headers["Authorization"] = f"Bearer {api_token(self.state_dir)}"
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Bugsink not ready after {timeout}s:\n{self.logs()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        self.http.close()
        return stop_process(self.process, timeout=timeout)

    def __enter__(self) -> BugsinkServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:] if self.log_path.exists() else ""

    def get(self, path: str, **params: str) -> Any:
        response = self.http.get(f"{API}{path}", params=params)
        response.raise_for_status()
        return response.json()

    def issues(self, **params: str) -> list[dict[str, Any]]:
        """Issues of every project, newest first; `q` searches titles and `key:value` tags."""
        return self.get("/issues/", **params)["results"]

    def issues_with_tag(self, key: str, value: str) -> list[dict[str, Any]]:
        return self.issues(q=f'{key}:"{value}"')

    def issue_tags(self, issue_id: str) -> dict[str, set[str]]:
        """Every tag key of an issue's events, with the values seen."""
        tags: dict[str, set[str]] = {}
        for tag in self.get(f"/issues/{issue_id}/tags/")["results"]:
            tags.setdefault(tag["key"], set()).add(tag["value"])
        return tags

    def events(self, issue_id: str) -> list[dict[str, Any]]:
        """An issue's events, each with its full Sentry payload under "data"."""
        return [self.get(f"/events/{event['id']}/") for event in self.get("/events/", issue=issue_id)["results"]]
