"""The one settings object. Each process reads it once, in its composition root, through `load_settings()`."""

from __future__ import annotations

import ipaddress
import re
import sys
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, PostgresDsn, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.messaging.topology import connection_parameters

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
BOLNA_CONNECT_TIMEOUT_SECONDS = 5.0  # connecting is given at most this; the read timeout is BOLNA_TIMEOUT_SECONDS


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/callflow"
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    bolna_api_url: str = "http://127.0.0.1:8010"
    bolna_api_key: str = ""
    bolna_timeout_seconds: float = Field(10.0, gt=0)
    bolna_breaker_threshold: int = Field(5, ge=1)
    bolna_breaker_cooldown_seconds: float = Field(30.0, gt=0)
    dispatch_max_attempts: int = Field(5, ge=1)
    webhook_secret: str = ""
    # Standard Webhooks signing secret (whsec_...): requests that carry webhook-signature are verified with it.
    webhook_signing_secret: str = ""
    # Comma-separated addresses or networks allowed to post webhooks; empty allows any source.
    webhook_allowed_ips: Annotated[tuple[IPNetwork, ...], NoDecode] = ()
    # Reverse proxies in front of the service whose X-Forwarded-For is trusted to name the client.
    trusted_proxy_count: int = Field(0, ge=0)

    sentry_dsn: str = ""
    sentry_environment: str = "development"
    sentry_release: str = ""
    sentry_traces_sample_rate: float = Field(0.2, ge=0, le=1)
    sentry_profiles_sample_rate: float = Field(0.1, ge=0, le=1)
    sentry_enable_logs: bool = False
    sentry_send_default_pii: bool = False
    sentry_send_in_development: bool = False
    # Crons check-ins from the periodic jobs; off where the DSN is a local Bugsink, which drops them. Empty (as in
    # .env.example, which every process `make up` starts reads) is the default: the Procfile derives the
    # queue-processor's value from SENTRY_DSN.
    sentry_crons: bool = True
    # `callctl sentry apply|release`: the Sentry API (self-hosted: its own URL) and a token with the scopes
    # SENTRY_TOKEN_SCOPES (shared/cli/sentry.py) names.
    sentry_url: str = "https://sentry.io"
    sentry_auth_token: str = ""
    # Who alerts notify; an action is added only for a target that is set. The e-mail is an organization member's;
    # the Slack workspace is the name of the organization's Slack integration; the channel is written `#name`.
    sentry_alert_email: str = ""
    sentry_alert_slack_workspace: str = ""
    sentry_alert_slack_channel: str = ""
    # Alert thresholds (deploy/sentry): events in the alert's window (more than this fires), then p95 durations
    # (of queued call placement and of dispatch handling for PROVIDER and DISPATCH_LATENCY) and the failure rate.
    sentry_alert_bolna_failures: int = Field(5, ge=0)
    sentry_alert_webhook_failures: int = Field(3, ge=0)
    sentry_alert_queue_failures: int = Field(5, ge=0)
    sentry_alert_webhook_auth_failures: int = Field(10, ge=0)
    sentry_alert_call_initiate_p95_ms: float = Field(3000.0, gt=0)
    sentry_alert_provider_p95_ms: float = Field(5000.0, gt=0)
    sentry_alert_dispatch_latency_p95_ms: float = Field(5000.0, gt=0)
    sentry_alert_failure_rate: float = Field(0.05, gt=0, le=1)

    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535)
    # Gunicorn worker processes; unset: one per CPU the container is given (see shared/http/gunicorn_config.py).
    web_concurrency: int | None = Field(None, ge=1)
    web_threads: int = Field(8, ge=1)

    slot_lease_seconds: int = Field(3600, gt=0)
    # The short lease of a slot whose call Bolna has not confirmed yet: a reservation that never reached Bolna
    # (a crash, a database blip) comes back in minutes. Must outlast a Bolna request (connect + read).
    initiating_lease_seconds: float = Field(30.0, gt=0)
    # No news from Bolna about a live call for this long: ask Bolna (a lost webhook, a lost answer to POST /call).
    reconcile_after_seconds: float = Field(300.0, gt=0)
    # A call Bolna may have placed (its answer was lost) that neither a webhook nor a search finds in this long fails.
    outcome_unknown_after_seconds: float = Field(300.0, gt=0)
    sweep_interval_seconds: float = Field(5.0, gt=0)
    # The sweep only catches wake-up messages that were missed; messages place queued calls.
    pending_sweep_interval_seconds: float = Field(60.0, gt=0)
    # Retention: published outbox rows are deleted, applied webhook payloads (transcripts, phone numbers, user
    # data) are redacted to their ids, and idempotency keys stop replaying and are deleted, after these periods.
    outbox_retention_hours: float = Field(24.0, gt=0)
    webhook_payload_retention_days: float = Field(30.0, gt=0)
    idempotency_key_retention_hours: float = Field(24.0, gt=0)
    retention_interval_seconds: float = Field(3600.0, gt=0)
    rabbitmq_prefetch: int = Field(10, ge=1)
    # Calls the queue-processor places with Bolna at once (each on its own thread, waiting for Bolna's answer).
    dispatch_concurrency: int = Field(8, ge=1, le=64)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @property
    def bolna_connect_timeout_seconds(self) -> float:
        return min(BOLNA_CONNECT_TIMEOUT_SECONDS, self.bolna_timeout_seconds)

    @model_validator(mode="after")
    def _bounds_outlast_a_bolna_request(self) -> Settings:
        # A lease that ends, or a call given up, while its POST /call is still in flight would free a slot Bolna
        # may be about to use.
        longest_request = self.bolna_connect_timeout_seconds + self.bolna_timeout_seconds
        if self.initiating_lease_seconds <= longest_request:
            raise ValueError(
                f"INITIATING_LEASE_SECONDS must exceed the longest Bolna request ({longest_request:g}s: "
                "BOLNA_TIMEOUT_SECONDS to read, plus up to 5 s to connect)"
            )
        if self.outcome_unknown_after_seconds < self.initiating_lease_seconds:
            raise ValueError("OUTCOME_UNKNOWN_AFTER_SECONDS must be at least INITIATING_LEASE_SECONDS")
        return self

    @field_validator("webhook_secret")
    @classmethod
    def _url_safe(cls, value: str) -> str:
        # Bolna sends it back in a URL: any other character is read otherwise there (a `+` as a space), and every
        # webhook would be refused as unauthenticated.
        if not re.fullmatch(r"[A-Za-z0-9._~-]*", value):
            raise ValueError("WEBHOOK_SECRET may hold only letters, digits and . _ ~ - (it travels in a URL)")
        return value

    @model_validator(mode="after")
    def _production_webhook_secret_is_strong(self) -> Settings:
        # Bolna does not sign its webhooks: this secret in their URL is what stands between the public internet and
        # the call statuses and charges. Every service checks it, so a production deployment cannot start with a
        # guessable one; `dev-webhook-secret-change-me` is the value .env.example ships with.
        weak = len(self.webhook_secret) < 32 or self.webhook_secret == "dev-webhook-secret-change-me"
        if self.sentry_environment == "production" and weak:
            raise ValueError(
                "WEBHOOK_SECRET must be a random string of at least 32 characters, other than the .env.example "
                "value, in production (SENTRY_ENVIRONMENT=production); generate one with: openssl rand -hex 32"
            )
        return self

    @field_validator("sentry_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL such as https://sentry.io, not {value!r}")
        return value

    @field_validator("sentry_alert_slack_channel")
    @classmethod
    def _slack_channel(cls, value: str) -> str:
        # Sentry stores the channel as `#name`: one given without it would differ on every apply, and be updated.
        if value and not value.startswith("#"):
            raise ValueError(f"must start with # (#{value}), as Sentry stores it")
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, value: str) -> str:
        PostgresDsn(value)
        return value

    @field_validator("sentry_crons", mode="before")
    @classmethod
    def _empty_is_the_default(cls, value: object) -> object:
        return cls.model_fields["sentry_crons"].default if isinstance(value, str) and not value.strip() else value

    @field_validator("webhook_allowed_ips", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in value.split(",") if part.strip())
        return value

    @field_validator("rabbitmq_url")
    @classmethod
    def _amqp_nodes(cls, value: str) -> str:
        """One amqp:// or amqps:// URL, or several (a cluster's nodes) separated by commas; connecting reads them."""
        connection_parameters(value)  # the code that connects reads the nodes, so it alone says what is valid
        return value


class ConfigurationError(SystemExit):
    """Raised at start when the environment holds a missing or malformed value."""


def load_settings() -> Settings:
    """Reads the environment; a missing or malformed value stops the process, naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(_problem(err) for err in exc.errors())
        raise invalid(problems) from exc


def _problem(error: Any) -> str:
    """`NAME: what is wrong`; a rule over several settings names them in its message instead."""
    name = ".".join(str(part) for part in error["loc"]).upper()
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{name}: {message}" if name else message


def invalid(problem: str) -> ConfigurationError:
    """The error that stops a service at start; `problem` names the variable."""
    print(f"callflow: invalid configuration: {problem}", file=sys.stderr)
    return ConfigurationError(2)


def require(settings: Settings, *names: str) -> Settings:
    """Fails at start, naming the variable, when a service needs a setting that is empty."""
    missing = [name.upper() for name in names if not getattr(settings, name)]
    if missing:
        raise invalid(f"{', '.join(missing)} must be set")
    return settings
