"""Bolna's HTTP API: placing a call and reading an execution back."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase

from shared.bolna.breaker import CircuitBreaker
from shared.core.config import Settings

CONNECT_TIMEOUT_SECONDS = 5.0


@dataclass
class BolnaError(Exception):
    """A failed Bolna request. `status_code` is None when no answer came (timeout, connection, open breaker)."""

    endpoint: str
    message: str
    status_code: int | None = None
    duration_ms: float = 0.0
    retry_after_seconds: float | None = None
    sent: bool = True  # False: the breaker held the request back, Bolna never saw it

    def __str__(self) -> str:
        answer = f"HTTP {self.status_code}" if self.status_code else "no answer"
        return f"Bolna {self.endpoint}: {answer}: {self.message}"

    @property
    def transient(self) -> bool:
        """May succeed later: no answer, a 5xx, or 429. Any other 4xx will fail the same way again."""
        return self.status_code is None or self.status_code >= 500 or self.status_code == 429


@dataclass(frozen=True)
class PlacedCall:
    execution_id: str
    status: str
    duration_ms: float


class BolnaClient:
    def __init__(self, base_url: str, api_key: str, timeout_seconds: float, breaker: CircuitBreaker, pool_size: int):
        self.breaker = breaker
        self._base_url = base_url.rstrip("/")
        self._timeout = (min(CONNECT_TIMEOUT_SECONDS, timeout_seconds), timeout_seconds)  # (connect, read)
        self._http = requests.Session()
        self._http.auth = _BearerToken(api_key)  # an explicit auth also keeps ~/.netrc from replacing the key
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
            pool_size=settings.web_threads,
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
        if not execution_id:
            raise BolnaError("/call", "answer without execution_id", 200, duration_ms)
        return PlacedCall(str(execution_id), str(answer.get("status") or "queued"), duration_ms)

    def get_execution(self, execution_id: str) -> dict[str, Any]:
        answer, _ = self._request("GET", f"/executions/{execution_id}", "/executions/{id}")
        return answer if isinstance(answer, dict) else {}

    def stop_execution(self, execution_id: str) -> None:
        self._request("POST", f"/call/{execution_id}/stop", "/call/{id}/stop")

    def _request(self, method: str, path: str, endpoint: str | None = None, **kwargs: Any) -> tuple[Any, float]:
        endpoint = endpoint or path
        if not self.breaker.allow():
            raise BolnaError(endpoint, "circuit open: Bolna failed repeatedly, requests are held back", sent=False)
        started = time.monotonic()
        try:
            answer, duration_ms = self._send(method, path, endpoint, started, **kwargs)
        except BolnaError as exc:
            if exc.transient:
                self.breaker.record_failure()
            else:
                self.breaker.record_success()  # Bolna answered: it is up, the request was wrong
            raise
        self.breaker.record_success()
        return answer, duration_ms

    def _send(self, method: str, path: str, endpoint: str, started: float, **kwargs: Any) -> tuple[Any, float]:
        try:
            response = self._http.request(
                method, self._base_url + path, timeout=self._timeout, allow_redirects=False, **kwargs
            )
        except requests.Timeout as exc:
            raise BolnaError(endpoint, f"timed out: {exc!r}", None, _ms_since(started)) from exc
        except requests.RequestException as exc:
            raise BolnaError(endpoint, f"request failed: {exc!r}", None, _ms_since(started)) from exc
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
        )


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


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
