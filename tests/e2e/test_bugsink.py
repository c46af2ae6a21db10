"""An error of a real service lands in a real local Bugsink (deploy/bugsink/) as an issue tagged with its error_type."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import bugsink
from tests.support.bugsink import BugsinkServer
from tests.support.factories import customer
from tests.support.processes import ServiceProcess, free_port
from tests.support.stack import wait_until

# A cold setup installs Bugsink into its own venv first.
pytestmark = pytest.mark.timeout(900)


def _received(server: BugsinkServer) -> str:
    """What Bugsink did get: each issue with its tags, to tell a missing event from a missing tag."""
    lines = [
        f"{issue['friendly_id']} {issue['calculated_type']}: {server.issue_tags(issue['id'])}"
        for issue in server.issues()
    ]
    return "issues in Bugsink:\n" + "\n".join(lines or ["none"])


@pytest.fixture(scope="module")
def bugsink_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BugsinkServer]:
    state = tmp_path_factory.mktemp("bugsink")
    port = free_port()
    bugsink.setup(state, port)
    with BugsinkServer(state, port, tmp_path_factory.mktemp("bugsink-logs")) as server:
        yield server


def test_bolna_api_failure_is_an_issue_in_bugsink_tagged_with_its_error_type(
    bugsink_server: BugsinkServer, tmp_path: Path
) -> None:
    owner = customer()
    nothing_listens = free_port()
    initiator = ServiceProcess(
        "services.call_initiator",
        free_port(),
        {
            "SENTRY_DSN": bugsink_server.dsn,
            "SENTRY_SEND_IN_DEVELOPMENT": "true",
            "SENTRY_TRACES_SAMPLE_RATE": "0",
            "BOLNA_API_URL": f"http://127.0.0.1:{nothing_listens}",
        },
        tmp_path,
    )
    try:
        initiator.start()
        response = httpx.post(
            f"{initiator.url}/api/calls",
            headers=owner.auth,
            json={"agentId": str(owner.agent_id), "phoneNumber": "+14155550123"},
            timeout=30,
        )
        assert response.status_code == 502, response.text
        assert response.json()["error_type"] == "bolna_api_failure"

        try:
            issues = wait_until(
                lambda: bugsink_server.issues_with_tag("error_type", "bolna_api_failure"),
                60,
                "an issue tagged error_type=bolna_api_failure in Bugsink",
            )
        except AssertionError as error:
            raise AssertionError(f"{error}\n{_received(bugsink_server)}\ncall-initiator:\n{initiator.logs()}") from None
    finally:
        initiator.stop()

    assert len(issues) == 1, issues
    assert issues[0]["calculated_type"] == "BolnaApiFailure", "the issue is titled with its error type"
    assert bugsink_server.issue_tags(issues[0]["id"])["error_type"] == {"bolna_api_failure"}
    events = bugsink_server.events(issues[0]["id"])
    assert events
    assert all(event["data"]["tags"]["error_type"] == "bolna_api_failure" for event in events), events
