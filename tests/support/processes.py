"""Starting the real services as processes, and waiting until they answer /health."""

from __future__ import annotations

import fcntl
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx

REPO = Path(__file__).resolve().parents[2]


# Service ports come from a range below the kernel's ephemeral ports (32768-60999 by default), so no outgoing
# connection of any process can be given one between choosing it and the service binding it; and above the ports
# a service or tool binds on purpose here (PostgreSQL, RabbitMQ 5672/25672, `make up` 8001-8010).
PORT_RANGE = range(20000, 25000)
_PORT_CLAIMS = Path(tempfile.gettempdir()) / "callflow-test-ports"
_claimed: dict[int, IO[bytes]] = {}  # open lock files: the claims last as long as this test run


def free_port() -> int:
    """A port nothing listens on and no other test run will take: claimed with a lock file held until this run ends.

    A port from bind(0) is an ephemeral port, which the kernel may hand to any outgoing connection before the
    service binds it; a port of PORT_RANGE is never handed out that way, and the lock keeps parallel runs apart.
    """
    _PORT_CLAIMS.mkdir(exist_ok=True)
    ephemeral = _ephemeral_ports()
    start = random.randrange(len(PORT_RANGE))  # parallel runs start far apart
    for offset in range(len(PORT_RANGE)):
        port = PORT_RANGE[(start + offset) % len(PORT_RANGE)]
        if port in _claimed or port in ephemeral:
            continue
        claim = (_PORT_CLAIMS / f"{port}.lock").open("wb")
        try:
            fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another run holds it
            claim.close()
            continue
        if _bindable(port):
            _claimed[port] = claim
            return port
        claim.close()  # something outside the test runs listens there
    raise RuntimeError(f"no free port in {PORT_RANGE}")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return range(0)
    return range(low, high + 1)


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
