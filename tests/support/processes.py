"""Starting the real services as processes, and waiting until they answer /health."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(
    process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 30.0
) -> int | None:
    """Signals a process and returns its exit code; one that ignores the signal is killed."""
    if process is None or process.poll() is not None:
        return process.returncode if process else None
    process.send_signal(sig)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(10)


class ServiceProcess:
    def __init__(self, module: str, port: int, env: dict[str, str], log_dir: Path):
        self.module = module
        self.port = port
        self.env = {**os.environ, **env, "PORT": str(port)}
        self.log_path = log_dir / f"{module.rsplit('.', 1)[-1]}-{port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 45.0, expected_status: int = 200) -> ServiceProcess:
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_healthy(timeout, expected_status)
        return self

    def wait_healthy(self, timeout: float = 45.0, expected_status: int = 200) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.module} exited with {self.process.returncode}:\n{self.logs()}")
            try:
                response = httpx.get(f"{self.url}/health", timeout=10)
                if response.status_code == expected_status:
                    return response
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.module} /health not {expected_status} after {timeout}s:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        return stop_process(self.process, sig, timeout)

    def logs(self, tail: int | None = 8000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:] if tail else text
