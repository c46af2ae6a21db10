"""The Bolna client against a real HTTP server: an answer that redirects is a failure, never followed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shared.bolna.breaker import CircuitBreaker
from shared.bolna.client import BolnaClient, BolnaError


class _Redirecting(BaseHTTPRequestHandler):
    requests_seen: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (the http.server API)
        self.requests_seen.append(self.path)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(307)
        self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def redirecting_bolna() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirecting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_redirect_is_a_definite_failure_and_is_not_followed(redirecting_bolna):
    _Redirecting.requests_seen.clear()
    client = BolnaClient(redirecting_bolna, "key", 2.0, CircuitBreaker(5, 30), pool_size=2)
    with pytest.raises(BolnaError) as raised:
        client.place_call("agent", "+14155550123", {})
    assert (raised.value.status_code, raised.value.transient) == (307, False)
    assert _Redirecting.requests_seen == ["/call"]
