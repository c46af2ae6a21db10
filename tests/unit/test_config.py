import subprocess
import sys

from tests.support.processes import REPO


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
