"""Bolna's HTTP API: placing a call and reading an execution back."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import httpx

from shared.config import get_settings


@dataclass
class BolnaError(Exception):
    """A failed Bolna request. `status_code` is None when no answer came (timeout, connection error)."""

    endpoint: str
    message: str
    status_code: int | None = None
    duration_ms: float = 0.0
    retry_after_seconds: float | None = None

    def __str__(self) -> str:
        answer = f"HTTP {self.status_code}" if self.status_code else "no answer"
        return f"Bolna {self.endpoint}: {answer}: {self.message}"


@dataclass(frozen=True)
class PlacedCall:
    execution_id: str
    status: str
    duration_ms: float


class BolnaClient:
    def __init__(self, base_url: str, api_key: str, timeout_seconds: float):
        self._http = httpx.Client(
            base_url=base_url,
            timeout=httpx.Timeout(timeout_seconds, connect=min(5.0, timeout_seconds)),
            headers={"Authorization": f"Bearer {api_key}"},
        )

    def place_call(self, agent_id: str, phone_number: str, user_data: dict[str, Any]) -> PlacedCall:
        body = {"agent_id": agent_id, "recipient_phone_number": phone_number, "user_data": user_data}
        answer, duration_ms = self._request("POST", "/call", json=body)
        execution_id = answer.get("execution_id") if isinstance(answer, dict) else None
        if not execution_id:
            raise BolnaError("/call", "answer without execution_id", 200, duration_ms)
        return PlacedCall(str(execution_id), str(answer.get("status") or "queued"), duration_ms)

    def get_execution(self, execution_id: str) -> dict[str, Any]:
        answer, _ = self._request("GET", f"/executions/{execution_id}")
        return answer

    def _request(self, method: str, path: str, **kwargs: Any) -> tuple[Any, float]:
        endpoint = path if not path.startswith("/executions/") else "/executions/{id}"
        started = time.monotonic()
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise BolnaError(endpoint, f"timed out: {exc!r}", None, _ms_since(started)) from exc
        except httpx.HTTPError as exc:
            raise BolnaError(endpoint, f"request failed: {exc!r}", None, _ms_since(started)) from exc
        duration_ms = _ms_since(started)
        if response.is_success:
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


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def _error_message(response: httpx.Response) -> str:
    """Bolna answers `{"error", "message"}`, or `{"detail"}` for a bad key."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("message") or body.get("detail") or body)[:500]
    return str(body)[:500]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


@functools.cache
def get_bolna_client() -> BolnaClient:
    settings = get_settings()
    return BolnaClient(settings.bolna_api_url, settings.bolna_api_key, settings.bolna_timeout_seconds)
