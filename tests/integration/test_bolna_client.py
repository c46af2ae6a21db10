"""The Bolna client against a real HTTP server: what each failure tells about whether Bolna acted on the request,
Retry-After read safely, the breaker released on every exit, and a redirect never followed."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shared.bolna import client as client_module
from shared.bolna.breaker import CircuitBreaker
from shared.bolna.client import (
    BREAKER_PLACE,
    MAX_RETRY_AFTER_SECONDS,
    OUTAGE_REPORT_INTERVAL_SECONDS,
    BolnaClient,
    BolnaError,
    Delivery,
)
from shared.core.errors import ErrorType


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


def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def redirecting_bolna() -> Iterator[str]:
    yield from _serve(_Redirecting)


def test_a_redirect_is_a_definite_failure_and_is_not_followed(redirecting_bolna):
    _Redirecting.requests_seen.clear()
    client = BolnaClient(redirecting_bolna, "key", 2.0, CircuitBreaker(5, 30), pool_size=2)
    with pytest.raises(BolnaError) as raised:
        client.place_call("agent", "+14155550123", {})
    assert (raised.value.status_code, raised.value.transient) == (307, False)
    assert _Redirecting.requests_seen == ["/call"]


PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def _environment_proxy(monkeypatch: pytest.MonkeyPatch, proxy: str, no_proxy: str = "") -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("http_proxy", proxy)
    monkeypatch.setenv("no_proxy", no_proxy)


def test_bolna_is_reached_as_the_environment_said_when_the_client_was_built(redirecting_bolna, monkeypatch):
    """The proxy settings are read once, at start: the proxy named then carries every request to Bolna, and a host
    NO_PROXY names is reached directly."""
    _Redirecting.requests_seen.clear()
    _environment_proxy(monkeypatch, redirecting_bolna)
    proxied = BolnaClient("http://bolna.invalid", "key", 2.0, CircuitBreaker(5, 30), pool_size=2)
    _environment_proxy(monkeypatch, "http://127.0.0.1:9", no_proxy="127.0.0.1")
    direct = BolnaClient(redirecting_bolna, "key", 2.0, CircuitBreaker(5, 30), pool_size=2)
    for client in (proxied, direct):
        with pytest.raises(BolnaError):
            client.place_call("agent", "+14155550123", {})
    assert _Redirecting.requests_seen == ["http://bolna.invalid/call", "/call"]


def test_the_ca_bundle_the_environment_named_when_the_client_was_built_verifies_bolna(monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/bolna-ca.pem")
    client = BolnaClient("https://127.0.0.1:9", "key", 2.0, CircuitBreaker(5, 30), pool_size=2)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    with pytest.raises(OSError, match="invalid path: /nonexistent/bolna-ca.pem"):
        client.place_call("agent", "+14155550123", {})


class _Scripted(BaseHTTPRequestHandler):
    """Answers POST /call as `behaviour` says: a status (with headers), "hang" past the client's read timeout,
    or "reset" (the request is read, then the connection is dropped with no answer)."""

    behaviour: tuple[str | int, dict[str, str]] = (200, {})

    def do_POST(self) -> None:  # noqa: N802 (the http.server API)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        what, headers = self.behaviour
        if what == "hang":
            time.sleep(1.5)
            return
        if what == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            return
        self.send_response(int(what))
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted_bolna() -> Iterator[str]:
    yield from _serve(_Scripted)


def _client(url: str, breaker: CircuitBreaker | None = None) -> BolnaClient:
    return BolnaClient(url, "key", 0.5, breaker or CircuitBreaker(5, 30), pool_size=2)


def _failure(url: str, behaviour: str | int, **headers: str) -> BolnaError:
    _Scripted.behaviour = (behaviour, headers)
    with pytest.raises(BolnaError) as raised:
        _client(url).place_call("agent", "+14155550123", {})
    return raised.value


@pytest.mark.parametrize(
    ("behaviour", "delivery"),
    [
        ("hang", Delivery.UNKNOWN),  # read timeout: Bolna may have placed the call
        ("reset", Delivery.UNKNOWN),  # dropped after the request was sent
        (500, Delivery.UNKNOWN),
        (502, Delivery.UNKNOWN),  # a gateway's answer says nothing of what Bolna did
        (200, Delivery.UNKNOWN),  # a 2xx without an execution id
        (400, Delivery.ANSWERED),
        (429, Delivery.ANSWERED),
    ],
)
def test_what_a_failed_request_tells_about_whether_bolna_acted(scripted_bolna, behaviour, delivery):
    assert _failure(scripted_bolna, behaviour).delivery is delivery


def test_a_refused_connection_provably_never_reached_bolna():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with pytest.raises(BolnaError) as raised:
        _client(f"http://127.0.0.1:{closed_port}").place_call("agent", "+14155550123", {})
    assert raised.value.delivery is Delivery.NOT_SENT


@pytest.mark.parametrize(
    ("retry_after", "seconds"),
    [("inf", None), ("nan", None), ("1e20", MAX_RETRY_AFTER_SECONDS), ("-5", 0.0), ("7", 7.0), ("soon", None)],
)
def test_retry_after_is_finite_and_capped(scripted_bolna, retry_after, seconds):
    assert _failure(scripted_bolna, 429, **{"Retry-After": retry_after}).retry_after_seconds == seconds


def test_retry_after_as_an_http_date_counts_from_now(scripted_bolna):
    in_a_minute = formatdate(time.time() + 60, usegmt=True)
    seconds = _failure(scripted_bolna, 429, **{"Retry-After": in_a_minute}).retry_after_seconds
    assert seconds is not None and 50 <= seconds <= 61


def test_the_half_open_trial_is_released_when_the_request_breaks_unexpectedly(scripted_bolna, monkeypatch):
    clock = [0.0]
    breaker = CircuitBreaker(1, 10, clock=lambda: clock[0])
    client = _client(scripted_bolna, breaker)
    _Scripted.behaviour = (500, {})
    with pytest.raises(BolnaError):
        client.place_call("agent", "+14155550123", {})
    assert breaker.is_open
    clock[0] = 11.0  # the cooldown is over: the next request is the half-open trial
    monkeypatch.setattr(client._http, "request", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError):
        client.place_call("agent", "+14155550123", {})
    clock[0] = 22.0  # another cooldown later, a new trial must be allowed
    assert breaker.allow()


def test_an_outage_is_reported_once_when_it_opens_the_breaker_and_again_only_after_bolna_answered(
    scripted_bolna, monkeypatch
):
    reports: list[tuple[str | None, object]] = []
    monkeypatch.setattr(client_module, "report", lambda error, place=None: reports.append((place, error.error_type)))
    monkeypatch.setattr(client_module._OutageReports, "last", {})
    clock = [0.0]
    client = _client(scripted_bolna, CircuitBreaker(2, 10, clock=lambda: clock[0]))

    def place(behaviour: int) -> None:
        _Scripted.behaviour = (behaviour, {})
        with pytest.raises(BolnaError):
            client.place_call("agent", "+14155550123", {})

    for behaviour in (401, 503):  # Bolna refusing Callflow's key counts as much as Bolna failing
        place(behaviour)
    clock[0] = 11.0
    place(403)  # the half-open trial fails: the same outage
    assert reports == [(BREAKER_PLACE, ErrorType.BOLNA_UNAVAILABLE)]
    clock[0] = 22.0
    place(400)  # the trial gets an answer about the request: Bolna is up and takes Callflow's key
    for behaviour in (500, 500):
        place(behaviour)
    assert len(reports) == 1, "opened again within OUTAGE_REPORT_INTERVAL_SECONDS: a Bolna failing on and off"
    clock[0] = 44.0
    place(400)
    for behaviour in (401, 401):
        place(behaviour)
    assert len(reports) == 2, "a refused key after Bolna's blip is another problem, reported at once"
    clock[0] = 66.0
    place(400)
    monkeypatch.setitem(client_module._OutageReports.last, "failing", time.monotonic() - OUTAGE_REPORT_INTERVAL_SECONDS)
    for behaviour in (500, 500):
        place(behaviour)
    assert len(reports) == 3, "a new outage"


class _Answering(BaseHTTPRequestHandler):
    """Answers every GET 200 with `body`."""

    body = b"null"

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def answering_bolna() -> Iterator[str]:
    yield from _serve(_Answering)


@pytest.mark.parametrize("body", [b"null", b"[]", b"{}", b'{"id": "e", "status": 7}', b'"completed"'])
def test_a_2xx_that_is_no_execution_is_a_failure_that_says_nothing_of_the_call(answering_bolna, body):
    _Answering.body = body
    with pytest.raises(BolnaError) as raised:
        _client(answering_bolna).get_execution("e")
    assert (raised.value.status_code, raised.value.refused) == (200, False), "Bolna cannot be asked, for now"


@pytest.mark.parametrize("body", [b"null", b"[]", b"{}", b'{"data": {"id": "e"}}'])
def test_a_2xx_that_is_no_page_of_executions_is_a_failure_not_an_empty_page(answering_bolna, body):
    _Answering.body = body
    since = datetime.now(UTC)
    with pytest.raises(BolnaError) as raised:
        list(_client(answering_bolna).find_executions("agent", since, since))
    assert (raised.value.status_code, raised.value.refused) == (200, False), "not found, it would give the call up"
