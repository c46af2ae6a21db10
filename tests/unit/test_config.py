import subprocess
import sys

import pytest

from tests.support.processes import REPO, free_port


def _start_with(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = "from shared.core.config import load_settings; load_settings()"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_malformed_value_fails_at_start_naming_it():
    result = _start_with({"SENTRY_TRACES_SAMPLE_RATE": "lots", "PATH": "/usr/bin"})
    assert result.returncode == 2
    assert "SENTRY_TRACES_SAMPLE_RATE" in result.stderr


def test_wrong_scheme_fails_at_start_naming_it():
    result = _start_with({"RABBITMQ_URL": "http://127.0.0.1", "PATH": "/usr/bin"})
    assert result.returncode == 2
    assert "RABBITMQ_URL" in result.stderr


@pytest.mark.parametrize(
    ("bounds", "named"),
    [
        # The longest request is 5 s to connect plus 10 s to read: a lease of 15 s could end while it is in flight.
        ({"INITIATING_LEASE_SECONDS": "15", "BOLNA_TIMEOUT_SECONDS": "10"}, "INITIATING_LEASE_SECONDS must exceed"),
        ({"INITIATING_LEASE_SECONDS": "30", "OUTCOME_UNKNOWN_AFTER_SECONDS": "29"}, "OUTCOME_UNKNOWN_AFTER_SECONDS"),
    ],
)
def test_bounds_a_bolna_request_could_outlast_fail_at_start_naming_them(bounds, named):
    result = _start_with({**bounds, "PATH": "/usr/bin"})
    assert result.returncode == 2
    assert f"callflow: invalid configuration: {named}" in result.stderr


def test_webhook_receiver_refuses_to_start_without_a_secret():
    result = subprocess.run(
        [sys.executable, "-m", "services.webhook_receiver"],
        env={"PATH": "/usr/bin", "WEBHOOK_SECRET": ""},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "WEBHOOK_SECRET" in result.stderr


def test_webhook_receiver_refuses_a_malformed_signing_secret():
    env = {"PATH": "/usr/bin", "WEBHOOK_SECRET": "s", "WEBHOOK_SIGNING_SECRET": "whsec_!!!"}
    command = [sys.executable, "-m", "services.webhook_receiver"]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "WEBHOOK_SIGNING_SECRET" in result.stderr


PRODUCTION = {"PATH": "/usr/bin", "SENTRY_ENVIRONMENT": "production"}


@pytest.mark.parametrize(
    "secret",
    ["", "0123456789abcdef0123456789abcde", "dev-webhook-secret-change-me"],
    ids=["empty", "31 characters", "the .env.example value"],
)
@pytest.mark.parametrize("service", ["call_initiator", "webhook_receiver", "queue_processor"])
def test_every_service_refuses_a_weak_webhook_secret_in_production(service, secret):
    command = [sys.executable, "-m", f"services.{service}"]
    env = {**PRODUCTION, "WEBHOOK_SECRET": secret, "PORT": str(free_port())}
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "WEBHOOK_SECRET" in result.stderr


def test_a_webhook_secret_that_would_not_travel_a_url_unchanged_is_refused_at_start():
    result = _start_with({"PATH": "/usr/bin", "WEBHOOK_SECRET": "aGVsbG8+d29ybGQ/Zm9v/YmFy="})  # base64's + / =
    assert result.returncode == 2
    assert "WEBHOOK_SECRET may hold only" in result.stderr


def test_production_accepts_a_long_webhook_secret_and_development_any():
    assert _start_with({**PRODUCTION, "WEBHOOK_SECRET": "0123456789abcdef0123456789abcdef"}).returncode == 0
    assert _start_with({"PATH": "/usr/bin", "WEBHOOK_SECRET": "short"}).returncode == 0


def test_env_example_as_make_up_hands_it_to_every_process_loads():
    lines = (REPO / ".env.example").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    assert env["SENTRY_CRONS"] == "", "the Procfile derives it from SENTRY_DSN only when it is empty"
    result = _start_with({**env, "PATH": "/usr/bin"})
    assert result.returncode == 0, result.stderr
