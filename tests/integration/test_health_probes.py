"""Probes: liveness asks no dependency; readiness names the one that is down and probes at most once per cache
period, however often it is asked."""

from __future__ import annotations

import time

from shared.http import health
from shared.http.app import create_http_app
from tests.support.components import components


def _app(rabbitmq_url: str):
    settings = components().settings.model_copy(update={"rabbitmq_url": rabbitmq_url})
    check = health.HealthCheck("call-initiator", settings, components().engine)
    return create_http_app("call-initiator", check).test_client()


def test_liveness_answers_while_the_broker_is_unreachable_and_readiness_names_it(monkeypatch):
    probes: list[str] = []
    real_ping = health.topology.ping
    monkeypatch.setattr(health.topology, "ping", lambda url: (probes.append(url), real_ping(url)))
    client = _app("amqp://guest:guest@127.0.0.1:1/%2F")

    live = client.get("/health/live")
    assert (live.status_code, live.json) == (200, {"status": "ok", "service": "call-initiator"})
    assert probes == [], "liveness asks no dependency"

    answers = [client.get(path) for path in ("/health/ready", "/health/ready", "/health")]
    assert [answer.status_code for answer in answers] == [503, 503, 503]
    assert answers[0].json["checks"]["database"] == "ok"
    assert answers[0].json["checks"]["rabbitmq"].startswith("error:")
    assert set(answers[2].json) == {"status", "service", "sentry", "checks"}, "/health keeps its shape"
    assert len(probes) == 1, "three probes within the cache period: the broker was asked once"

    time.sleep(health.READY_CACHE_SECONDS + 0.1)
    client.get("/health/ready")
    assert len(probes) == 2, "asked again once the period is over"


def test_readiness_is_200_when_both_answer():
    answer = _app(components().settings.rabbitmq_url).get("/health/ready")
    assert answer.status_code == 200 and answer.json["checks"] == {"database": "ok", "rabbitmq": "ok"}


def test_readiness_is_200_while_any_node_of_the_cluster_answers():
    down = "amqp://guest:guest@127.0.0.1:1/%2F"
    answer = _app(f"{down},{components().settings.rabbitmq_url},{down}").get("/health/ready")
    assert answer.status_code == 200 and answer.json["checks"] == {"database": "ok", "rabbitmq": "ok"}
