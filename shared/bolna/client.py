"""Bolna's HTTP API: placing a call and reading an execution back."""

from __future__ import annotations

import logging
import math
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase
from urllib3.exceptions import NameResolutionError, NewConnectionError

from shared.bolna.breaker import CircuitBreaker
from shared.bolna.execution import AgentExecution
from shared.core.config import BOLNA_CONNECT_TIMEOUT_SECONDS, Settings
from shared.core.errors import CallflowError, ErrorType
from shared.observability.sentry import report

log = logging.getLogger(__name__)

BREAKER_PLACE = "bolna.breaker"  # where Bolna's outage is reported
OUTAGE_REPORT_INTERVAL_SECONDS = 900
MAX_RETRY_AFTER_SECONDS = 300.0  # a longer (or absurd) Retry-After is capped: the call is tried again by then
EXECUTIONS_PAGE_SIZE = 50  # the most Bolna's execution listing returns per page
MAX_EXECUTION_PAGES = 20  # a search reads at most this many pages (1,000 executions) of one agent's window


class Delivery(StrEnum):
    """What a failed request tells about whether Bolna acted on it: it decides whether a call may be redialled."""

    HELD_BACK = "held_back"  # the open breaker kept it from Bolna
    NOT_SENT = "not_sent"  # provably never reached Bolna: no connection was made
    ANSWERED = "answered"  # Bolna answered a definite refusal (4xx, 429): it did nothing
    UNKNOWN = "unknown"  # sent, but no definite answer (read timeout, dropped connection, 5xx, garbled 2xx)


@dataclass
class BolnaError(Exception):
    """A failed Bolna request. `status_code` is None when no answer came (timeout, connection, open breaker)."""

    endpoint: str
    message: str
    status_code: int | None = None
    duration_ms: float = 0.0
    retry_after_seconds: float | None = None
    delivery: Delivery = Delivery.UNKNOWN

    def __str__(self) -> str:
        answer = f"HTTP {self.status_code}" if self.status_code else "no answer"
        return f"Bolna {self.endpoint}: {answer}: {self.message}"

    @property
    def held_back(self) -> bool:
        return self.delivery is Delivery.HELD_BACK

    @property
    def transient(self) -> bool:
        """May succeed later: no answer, a 5xx, or 429. Any other 4xx will fail the same way again."""
        return self.status_code is None or self.status_code >= 500 or self.status_code == 429

    @property
    def key_refused(self) -> bool:
        """Bolna refused Callflow's API key (401, 403): no request can succeed until the key is mended."""
        return self.status_code in (401, 403)

    @property
    def refused(self) -> bool:
        """Bolna answered that what was asked cannot be done (it does not know the execution, or it has ended): a
        4xx, other than 429 and other than a refusal of Callflow's key (401, 403), which says nothing of the call
        and is Callflow's to fix. A 2xx that cannot be read says nothing either."""
        return (
            self.status_code is not None and 400 <= self.status_code < 500 and self.status_code not in (401, 403, 429)
        )


@dataclass(frozen=True)
class PlacedCall:
    execution_id: str
    status: str
    duration_ms: float


class BolnaClient:
    def __init__(self, base_url: str, api_key: str, timeout_seconds: float, breaker: CircuitBreaker, pool_size: int):
        self.breaker = breaker
        self._base_url = base_url.rstrip("/")
        self._timeout = (min(BOLNA_CONNECT_TIMEOUT_SECONDS, timeout_seconds), timeout_seconds)  # (connect, read)
        self._http = requests.Session()
        self._http.auth = _BearerToken(api_key)  # an explicit auth also keeps ~/.netrc from replacing the key
        # What the environment says of reaching Bolna (a proxy, NO_PROXY, a CA bundle) is read once, by requests'
        # own rules, for its one base URL: a process's environment does not change while it runs, and requests
        # reading it again on every request cost about 4% of the queue-processor's CPU while it dispatched.
        environment = self._http.merge_environment_settings(self._base_url, {}, None, None, None)
        self._http.proxies, self._http.verify = environment["proxies"], environment["verify"]
        self._http.trust_env = False
        # One pooled connection per thread that may call Bolna at once; no retries here: every retry of a
        # request that may have placed a call is Callflow's decision, never the transport's.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self._http.mount("http://", adapter)
        self._http.mount("https://", adapter)

    @classmethod
    def from_settings(cls, settings: Settings) -> BolnaClient:
        breaker = CircuitBreaker(settings.bolna_breaker_threshold, settings.bolna_breaker_cooldown_seconds)
        return cls(
            settings.bolna_api_url,
            settings.bolna_api_key,
            settings.bolna_timeout_seconds,
            breaker,
            pool_size=max(settings.web_threads, settings.dispatch_concurrency),
        )

    def place_call(self, agent_id: str, phone_number: str, user_data: dict[str, Any]) -> PlacedCall:
        body = {
            "agent_id": agent_id,
            "recipient_phone_number": phone_number,
            "user_data": user_data,
            # Every dial must go through Callflow's concurrency limit: Bolna must not redial on its own.
            "retry_config": {"enabled": False},
        }
        answer, duration_ms = self._request("POST", "/call", json=body)
        execution_id = answer.get("execution_id") if isinstance(answer, dict) else None
        if not execution_id:  # a 2xx that does not name the execution: the call may well be placed
            raise BolnaError("/call", "answer without execution_id", 200, duration_ms)
        return PlacedCall(str(execution_id), str(answer.get("status") or "queued"), duration_ms)

    def find_executions(self, agent_id: str, since: datetime, until: datetime) -> Iterator[dict[str, Any]]:
        """The agent's executions created in [since, until], newest first, page by page (a bounded number)."""
        window = {"from": _iso_utc(since), "to": _iso_utc(until), "page_size": EXECUTIONS_PAGE_SIZE}
        for page_number in range(1, MAX_EXECUTION_PAGES + 1):
            answer, duration_ms = self._request(
                "GET",
                f"/v2/agent/{agent_id}/executions",
                "/v2/agent/{id}/executions",
                params={**window, "page_number": page_number},
            )
            data = answer.get("data") if isinstance(answer, dict) else None
            if not isinstance(data, list):  # a page that cannot be read does not say the call is not there
                raise BolnaError("/v2/agent/{id}/executions", "answer is not a page of executions", 200, duration_ms)
            yield from (item for item in data if isinstance(item, dict))
            if not answer.get("has_more"):
                return

    def get_execution(self, execution_id: str) -> dict[str, Any]:
        answer, duration_ms = self._request("GET", f"/executions/{execution_id}", "/executions/{id}")
        if not isinstance(answer, dict) or AgentExecution(answer).status is None:
            # An answer that cannot be read says nothing of the call: it is not Bolna's word that it is over.
            raise BolnaError("/executions/{id}", "answer is not an execution with a status", 200, duration_ms)
        return answer

    def stop_execution(self, execution_id: str) -> None:
        self._request("POST", f"/call/{execution_id}/stop", "/call/{id}/stop")

    def _request(self, method: str, path: str, endpoint: str | None = None, **kwargs: Any) -> tuple[Any, float]:
        endpoint = endpoint or path
        if not self.breaker.allow():
            raise BolnaError(
                endpoint,
                "circuit open: Bolna failed repeatedly, requests are held back",
                delivery=Delivery.HELD_BACK,
            )
        started = time.monotonic()
        try:
            answer, duration_ms = self._send(method, path, endpoint, started, **kwargs)
        except BolnaError as exc:
            if exc.transient or exc.key_refused:  # Bolna is unusable, whatever is asked of it
                self._failed(exc)
            else:
                self._succeeded()  # Bolna answered: it is up, the request was wrong
            raise
        except BaseException:
            # Whatever else broke (a bug, an interrupt), the breaker must not keep a half-open trial forever.
            self.breaker.record_failure()
            raise
        self._succeeded()
        return answer, duration_ms

    def _failed(self, error: BolnaError) -> None:
        # Once per outage, per process (every request meets it), and at most once per OUTAGE_REPORT_INTERVAL: a
        # Bolna that fails on and off closes and opens the breaker every cooldown.
        if self.breaker.record_failure() and _OutageReports.admit("key refused" if error.key_refused else "failing"):
            report(
                CallflowError(
                    ErrorType.BOLNA_UNAVAILABLE,
                    f"Bolna keeps failing ({error}); its requests are held back, one trial at a time, until one "
                    "succeeds.",
                    sentry_contexts={
                        "bolna_api": {
                            "endpoint": error.endpoint,
                            "status_code": error.status_code,
                            "error_message": error.message,
                            "delivery": error.delivery.value,
                        }
                    },
                ),
                place=BREAKER_PLACE,
            )

    def _succeeded(self) -> None:
        if self.breaker.record_success():
            log.warning("Bolna answers again: its requests are no longer held back")

    def _send(self, method: str, path: str, endpoint: str, started: float, **kwargs: Any) -> tuple[Any, float]:
        try:
            response = self._http.request(
                method, self._base_url + path, timeout=self._timeout, allow_redirects=False, **kwargs
            )
        except requests.RequestException as exc:
            delivery = Delivery.NOT_SENT if _never_connected(exc) else Delivery.UNKNOWN
            what = "timed out" if isinstance(exc, requests.Timeout) else "request failed"
            raise BolnaError(endpoint, f"{what}: {exc!r}", None, _ms_since(started), delivery=delivery) from exc
        duration_ms = _ms_since(started)
        if 200 <= response.status_code < 300:
            try:
                return response.json(), duration_ms
            except ValueError as exc:
                raise BolnaError(endpoint, "answer is not JSON", response.status_code, duration_ms) from exc
        raise BolnaError(
            endpoint,
            _error_message(response),
            response.status_code,
            duration_ms,
            _retry_after(response.headers.get("Retry-After")),
            # A 5xx may come from a gateway after Bolna acted; any other answer is Bolna's own refusal.
            Delivery.UNKNOWN if response.status_code >= 500 else Delivery.ANSWERED,
        )


class _OutageReports:
    """When each kind of outage (Bolna failing, Callflow's key refused) was last reported: a key refused after a
    blip of 5xx is another problem, with another fix, and is reported even within the interval."""

    lock = threading.Lock()
    last: dict[str, float] = {}

    @classmethod
    def admit(cls, kind: str) -> bool:
        with cls.lock:
            now = time.monotonic()
            if now - cls.last.get(kind, -math.inf) < OUTAGE_REPORT_INTERVAL_SECONDS:
                log.warning("Bolna: %s again; reported within the last %ss", kind, OUTAGE_REPORT_INTERVAL_SECONDS)
                return False
            cls.last[kind] = now
            return True


class _BearerToken(AuthBase):
    def __init__(self, token: str):
        self._header = f"Bearer {token}"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self._header
        return request


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def _error_message(response: requests.Response) -> str:
    """Bolna answers `{"error", "message"}`, or `{"detail"}` for a bad key."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason or ""
    if isinstance(body, dict):
        return str(body.get("message") or body.get("detail") or body)[:500]
    return str(body)[:500]


def _never_connected(exc: requests.RequestException) -> bool:
    """True when the request provably never reached Bolna: no connection (refused, unreachable, no DNS) or the
    connect timeout. A read timeout or a connection dropped after sending may follow a call Bolna placed."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)  # urllib3's MaxRetryError wraps the cause
    if isinstance(exc, requests.exceptions.SSLError):
        # Only a certificate refused during the handshake is before the request; a TLS error while reading the
        # answer comes as the same exception, after it.
        cause = reason.args[0] if isinstance(reason, Exception) and reason.args else None
        return isinstance(cause, ssl.SSLCertVerificationError)
    return isinstance(exc, requests.ConnectionError) and isinstance(reason, NewConnectionError | NameResolutionError)


def _retry_after(value: str | None) -> float | None:
    """Seconds from `Retry-After` (delta-seconds or an HTTP date), finite and capped; None when absent or garbled."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError, IndexError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS)


def _iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
