"""`/health` names the dependency that is down."""

import httpx
import pytest

from tests.support.processes import ServiceProcess, free_port

UNREACHABLE_BROKER = "amqp://guest:guest@127.0.0.1:1/%2F"


@pytest.mark.parametrize(
    ("module", "service"),
    [
        ("services.call_initiator", "call-initiator"),
        ("services.webhook_receiver", "webhook-receiver"),
        ("services.queue_processor", "queue-processor"),
    ],
)
def test_health_is_503_naming_the_broker_when_it_is_unreachable(module, service, tmp_path):
    process = ServiceProcess(module, free_port(), {"RABBITMQ_URL": UNREACHABLE_BROKER}, tmp_path)
    try:
        process.start(expected_status=503)
        body = httpx.get(f"{process.url}/health", timeout=10).json()
    finally:
        exit_code = process.stop()
    assert exit_code == 0, process.logs()
    assert body["service"] == service
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["rabbitmq"].startswith("error")
    assert body["sentry"]["configured"] is False
    assert body["sentry"]["enabled"] is False
    assert body["sentry"]["environment"] == "development"


def test_health_is_200_when_everything_is_up(stack):
    for process in stack.processes[:3]:
        body = httpx.get(f"{process.url}/health").json()
        assert body["status"] == "ok"
        assert body["checks"] == {"database": "ok", "rabbitmq": "ok"}
