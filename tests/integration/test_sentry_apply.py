"""`callctl sentry apply|release` against a stand-in for Sentry's API: the first apply creates every object of
deploy/sentry with a valid payload, a second one writes nothing, a changed threshold is one update, a dry run
writes nothing, two projects of one organization keep their own objects, objects no longer in the files are
reported and kept, and a refusal stops the command naming what was already applied."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner, Result

from shared.cli import main, sentry_definitions
from shared.cli.sentry import SENTRY_TOKEN_SCOPES
from shared.cli.sentry_definitions import (
    DASHBOARDS_FILE,
    DEFINITIONS_DIR,
    ISSUE_ALERTS_FILE,
    METRIC_ALERTS_FILE,
    SAVED_QUERIES_FILE,
    NotificationTargets,
    for_project,
)
from tests.support.sentry_api import SentryApiStandIn

ON_CALL = {"id": "71", "email": "oncall@example.com", "user": {"id": "9001"}}
OTHER_MEMBERS = [{"id": str(n), "email": f"member{n}@example.com", "user": {"id": str(100 + n)}} for n in range(3)]
SLACK = {"id": "31", "name": "Callflow Ops", "provider": {"key": "slack"}}
SLACK_CHANNEL = "#callflow-alerts"
TOKEN_SCOPES = frozenset(scope.strip() for scope in SENTRY_TOKEN_SCOPES.split(","))  # what the CLI asks for
PAGE_SIZE = 2  # every list, the alert target among the members included, spans several pages
PROD = "callflow-prod"
STAGING, STAGING_ID = "callflow-staging", 4507
BOLNA_SPIKE = f"Callflow ({PROD}): Bolna API failure spike"  # a metric alert: the organization's, so named for prod
CRITICAL = "Callflow: critical error"  # an issue alert: the project's


def _names(file: str, key: str = "name", directory: Path = DEFINITIONS_DIR) -> set[str]:
    return {item[key] for item in json.loads((directory / file).read_text())}


def _project_names(file: str, project: str, key: str = "name") -> set[str]:
    return {for_project(name, project) for name in _names(file, key)}


@pytest.fixture
def sentry_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[SentryApiStandIn]:
    stand_in = SentryApiStandIn(
        scopes=TOKEN_SCOPES,
        project=PROD,
        other_projects={STAGING: STAGING_ID},
        page_size=PAGE_SIZE,
        members=[*OTHER_MEMBERS, ON_CALL],
        integrations=[SLACK],
    )
    with stand_in.running():
        monkeypatch.setenv("SENTRY_URL", stand_in.url)
        monkeypatch.setenv("SENTRY_AUTH_TOKEN", stand_in.token)
        monkeypatch.setenv("SENTRY_ALERT_EMAIL", ON_CALL["email"])
        monkeypatch.setenv("SENTRY_ALERT_SLACK_WORKSPACE", SLACK["name"])
        monkeypatch.setenv("SENTRY_ALERT_SLACK_CHANNEL", SLACK_CHANNEL)
        yield stand_in


def _callctl(stand_in: SentryApiStandIn, command: str, *args: str, project: str = PROD) -> Result:
    return CliRunner().invoke(main, ["sentry", command, "--org", stand_in.org, "--project", project, *args])


def _apply(stand_in: SentryApiStandIn, *args: str, project: str = PROD) -> Result:
    return _callctl(stand_in, "apply", *args, project=project)


def _bolna_spike_threshold(stand_in: SentryApiStandIn) -> int:
    (rule,) = [rule for rule in stand_in.alert_rules.values() if rule["name"] == BOLNA_SPIKE]
    return rule["triggers"][0]["alertThreshold"]


def test_the_first_apply_creates_every_object_with_a_valid_payload(sentry_api: SentryApiStandIn):
    result = _apply(sentry_api)

    assert result.exit_code == 0, result.output
    assert sentry_api.rejected == []
    assert {rule["name"] for rule in sentry_api.rules.values()} == _names(ISSUE_ALERTS_FILE)
    assert {rule["name"] for rule in sentry_api.alert_rules.values()} == _project_names(METRIC_ALERTS_FILE, PROD)
    boards = _project_names(DASHBOARDS_FILE, PROD, "title")
    assert {board["title"] for board in sentry_api.dashboards.values()} == boards
    assert {query["name"] for query in sentry_api.saved_queries.values()} == _project_names(SAVED_QUERIES_FILE, PROD)
    assert all(write.method == "POST" for write in sentry_api.writes)
    assert "${" not in json.dumps([write.body for write in sentry_api.writes]), "a placeholder was sent unfilled"
    assert _bolna_spike_threshold(sentry_api) == 5  # SENTRY_ALERT_BOLNA_FAILURES's default
    for rule in sentry_api.rules.values():
        targets = {(action.get("targetIdentifier"), action.get("workspace")) for action in rule["actions"]}
        assert targets == {(9001, None), (None, int(SLACK["id"]))}, rule["name"]
    for rule in sentry_api.alert_rules.values():
        for trigger in rule["triggers"]:
            assert {action["type"] for action in trigger["actions"]} == {"email", "slack"}, rule["name"]


def test_only_the_targets_that_are_set_are_notified(sentry_api: SentryApiStandIn, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SENTRY_ALERT_SLACK_WORKSPACE")
    monkeypatch.delenv("SENTRY_ALERT_SLACK_CHANNEL")

    assert _apply(sentry_api).exit_code == 0

    actions = [action for rule in sentry_api.rules.values() for action in rule["actions"]]
    assert actions and all(action["targetIdentifier"] == 9001 for action in actions)


def test_an_alert_without_any_target_is_refused_before_anything_is_sent(
    sentry_api: SentryApiStandIn, monkeypatch: pytest.MonkeyPatch
):
    for name in ("SENTRY_ALERT_EMAIL", "SENTRY_ALERT_SLACK_WORKSPACE", "SENTRY_ALERT_SLACK_CHANNEL"):
        monkeypatch.delenv(name)

    result = _apply(sentry_api)

    assert result.exit_code == 2
    assert "notifies no one" in result.output
    assert sentry_api.writes == []


def test_a_second_apply_writes_nothing(sentry_api: SentryApiStandIn):
    assert _apply(sentry_api).exit_code == 0
    writes = len(sentry_api.writes)

    result = _apply(sentry_api)

    assert result.exit_code == 0, result.output
    assert len(sentry_api.writes) == writes
    assert "0 object(s) changed" in result.output
    assert "not in deploy/sentry" not in result.output


def test_two_projects_of_one_organization_keep_their_own_objects(sentry_api: SentryApiStandIn):
    assert _apply(sentry_api, project=STAGING).exit_code == 0
    assert _apply(sentry_api, project=PROD).exit_code == 0

    assert all(write.method == "POST" for write in sentry_api.writes), "one project's objects were moved"
    assert sentry_api.rejected == []
    for project, project_id in ((PROD, sentry_api.project_id), (STAGING, STAGING_ID)):
        assert {rule["name"] for rule in sentry_api.project_rules[project].values()} == _names(ISSUE_ALERTS_FILE)
        alerts = [rule for rule in sentry_api.alert_rules.values() if rule["projects"] == [project]]
        boards = [board for board in sentry_api.dashboards.values() if board["projects"] == [project_id]]
        queries = [query for query in sentry_api.saved_queries.values() if query["projects"] == [project_id]]
        assert {rule["name"] for rule in alerts} == _project_names(METRIC_ALERTS_FILE, project)
        assert {board["title"] for board in boards} == _project_names(DASHBOARDS_FILE, project, "title")
        assert {query["name"] for query in queries} == _project_names(SAVED_QUERIES_FILE, project)
    writes = len(sentry_api.writes)

    again = [_apply(sentry_api, project=project) for project in (STAGING, PROD)]

    assert [result.exit_code for result in again] == [0, 0], [result.output for result in again]
    assert len(sentry_api.writes) == writes
    assert not any("not in deploy/sentry" in result.output for result in again), "the other project's were listed"


def _definitions_copy(tmp_path: Path) -> Path:
    directory = tmp_path / "sentry"
    shutil.copytree(DEFINITIONS_DIR, directory)
    return directory


def _rename_first(directory: Path, file: str, key: str = "name") -> str:
    items = json.loads((directory / file).read_text())
    old, items[0][key] = items[0][key], f"{items[0][key]}: renamed"
    (directory / file).write_text(json.dumps(items))
    return old


def test_objects_no_longer_in_the_files_are_reported_and_kept(sentry_api: SentryApiStandIn, tmp_path: Path):
    directory = _definitions_copy(tmp_path)
    assert _apply(sentry_api, project=STAGING).exit_code == 0  # named like ours, but not prod's: not reported
    assert _apply(sentry_api, "--definitions", str(directory)).exit_code == 0
    rule = _rename_first(directory, ISSUE_ALERTS_FILE)
    alert = for_project(_rename_first(directory, METRIC_ALERTS_FILE), PROD)
    board = for_project(_rename_first(directory, DASHBOARDS_FILE, "title"), PROD)
    query = for_project(_rename_first(directory, SAVED_QUERIES_FILE), PROD)
    stores = (sentry_api.rules, sentry_api.alert_rules, sentry_api.dashboards, sentry_api.saved_queries)
    objects = sum(len(store) for store in stores)

    result = _apply(sentry_api, "--definitions", str(directory))

    assert result.exit_code == 0, result.output
    left = f"issue alert {rule!r}; metric alert {alert!r}; dashboard {board!r}; saved query {query!r}"
    assert f"not in deploy/sentry: {left}; delete by hand if unwanted" in result.output
    assert {request.method for request in sentry_api.requests} <= {"GET", "POST", "PUT"}
    assert sum(len(store) for store in stores) == objects + 4, "the renamed objects are created, the old ones kept"
    assert rule in {item["name"] for item in sentry_api.rules.values()}
    assert query in {item["name"] for item in sentry_api.saved_queries.values()}


def test_apply_without_the_definitions_directory_says_how_to_give_it(
    sentry_api: SentryApiStandIn, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    # As in an installed package (the image): the directory next to the code does not exist.
    monkeypatch.setattr(sentry_definitions, "DEFINITIONS_DIR", tmp_path / "site-packages" / "deploy" / "sentry")

    result = _apply(sentry_api)

    assert result.exit_code == 2
    assert "run from a checkout of Callflow (deploy/sentry) or pass --definitions DIR" in result.output
    assert sentry_api.requests == []


def test_lists_are_read_past_their_first_page(sentry_api: SentryApiStandIn):
    assert _apply(sentry_api).exit_code == 0
    assert len(sentry_api.rules) > PAGE_SIZE

    assert _apply(sentry_api).exit_code == 0

    assert len(sentry_api.rules) == len(_names(ISSUE_ALERTS_FILE)), "an alert past the first page was created again"
    assert any(request.query.get("cursor") == f"0:{PAGE_SIZE}:0" for request in sentry_api.requests)


def test_a_changed_threshold_is_exactly_one_update(sentry_api: SentryApiStandIn, monkeypatch: pytest.MonkeyPatch):
    assert _apply(sentry_api).exit_code == 0
    before = len(sentry_api.writes)
    monkeypatch.setenv("SENTRY_ALERT_BOLNA_FAILURES", "9")

    result = _apply(sentry_api)

    assert result.exit_code == 0, result.output
    (update,) = sentry_api.writes[before:]
    assert update.method == "PUT" and update.path.startswith(f"/api/0/organizations/{sentry_api.org}/alert-rules/")
    assert _bolna_spike_threshold(sentry_api) == 9
    assert f"updated metric alert {BOLNA_SPIKE!r}" in result.output


def test_a_dry_run_writes_nothing_and_prints_the_diff(sentry_api: SentryApiStandIn, monkeypatch: pytest.MonkeyPatch):
    first = _apply(sentry_api, "--dry-run")

    assert first.exit_code == 0, first.output
    assert sentry_api.writes == []
    assert f"+++ deploy/sentry: metric alert {BOLNA_SPIKE!r}" in first.output
    assert "dry run: nothing was changed" in first.output

    assert _apply(sentry_api).exit_code == 0
    applied = len(sentry_api.writes)
    monkeypatch.setenv("SENTRY_ALERT_BOLNA_FAILURES", "9")

    changed = _apply(sentry_api, "--dry-run")

    assert changed.exit_code == 0, changed.output
    assert len(sentry_api.writes) == applied
    changed_lines = [line.replace(" ", "").rstrip(",") for line in changed.output.splitlines()]
    assert '-"alertThreshold":5' in changed_lines and '+"alertThreshold":9' in changed_lines
    assert changed.output.count("+++ ") == 1
    assert _bolna_spike_threshold(sentry_api) == 5


@pytest.mark.parametrize("status", [403, 500])
def test_a_refusal_stops_the_apply_and_names_what_was_applied(sentry_api: SentryApiStandIn, status: int):
    sentry_api.fail("POST", "/alert-rules/", status)

    result = _apply(sentry_api)

    assert result.exit_code != 0
    assert f"POST /organizations/{sentry_api.org}/alert-rules/ failed: {status}" in result.output
    first_rule, *_, last_rule = (rule["name"] for rule in sentry_api.rules.values())
    assert f"already applied: created issue alert {first_rule!r}" in result.output
    assert f"created issue alert {last_rule!r}" in result.output.split("already applied:")[1]
    assert sentry_api.alert_rules == {} and sentry_api.dashboards == {} and sentry_api.saved_queries == {}


def test_an_answer_that_is_not_json_stops_the_apply_and_names_what_was_applied(sentry_api: SentryApiStandIn):
    sentry_api.answer_login_page("POST", "/alert-rules/")

    result = _apply(sentry_api)

    assert result.exit_code == 1
    failed = f"POST /organizations/{sentry_api.org}/alert-rules/ failed: 200 answer is not JSON (text/html"
    assert failed in result.output
    assert f"already applied: created issue alert {CRITICAL!r}" in result.output
    assert "Traceback" not in result.output


def test_a_rejected_token_changes_nothing_and_says_so(sentry_api: SentryApiStandIn, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SENTRY_AUTH_TOKEN", "revoked-token")

    result = _apply(sentry_api)

    assert result.exit_code != 0
    assert "401 Invalid token" in result.output and "nothing was changed" in result.output
    assert sentry_api.writes == []


def test_a_token_without_a_needed_scope_is_refused_and_nothing_is_changed(sentry_api: SentryApiStandIn):
    sentry_api.scopes = TOKEN_SCOPES - {"alerts:write"}

    result = _apply(sentry_api)

    assert result.exit_code != 0
    assert f"POST /projects/{sentry_api.org}/{sentry_api.project}/rules/ failed: 403" in result.output
    assert "nothing was changed" in result.output
    assert sentry_api.rules == {}


def test_release_is_created_with_its_commit_and_a_deploy_is_marked(sentry_api: SentryApiStandIn):
    sha = "4f2c0d9e8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e"
    args = ("--version", sha, "--environment", "production", "--repository", "acme/callflow", "--commit", sha)

    first = _callctl(sentry_api, "release", *args)
    again = _callctl(sentry_api, "release", *args)  # a rerun of the deploy job: the release exists already

    assert first.exit_code == 0 and again.exit_code == 0, first.output + again.output
    assert sentry_api.rejected == []
    release = sentry_api.releases[sha]
    assert release["projects"] == [sentry_api.project]
    assert release["refs"] == [{"repository": "acme/callflow", "commit": sha}]
    assert release["deploys"] == ["production", "production"]


def test_release_refused_says_what_failed(sentry_api: SentryApiStandIn):
    sentry_api.fail("POST", "/deploys/", 403)

    result = _callctl(sentry_api, "release", "--version", "abc123")

    assert result.exit_code != 0
    assert "release abc123 recorded" in result.output
    assert "deploys/ failed: 403" in result.output


def _valid_body(stand_in: SentryApiStandIn, kind: str) -> dict[str, Any]:
    """The first object of the kind's file as the CLI sends it (placeholders filled, targets and project added)."""
    file = {"rules": ISSUE_ALERTS_FILE, "alert-rules": METRIC_ALERTS_FILE, "saved": SAVED_QUERIES_FILE}[kind]
    body = json.loads(re.sub(r'"\$\{\w+\}"', "5", (DEFINITIONS_DIR / file).read_text()))[0]
    if kind == "rules":
        return {**body, "actions": NotificationTargets(ON_CALL["user"]["id"]).issue_alert_actions()}
    if kind == "alert-rules":
        actions = NotificationTargets(ON_CALL["user"]["id"]).metric_alert_actions()
        triggers = [{**trigger, "actions": actions} for trigger in body["triggers"]]
        return {**body, "triggers": triggers, "projects": [stand_in.project]}
    return {**body, "projects": [stand_in.project_id]}


@pytest.mark.parametrize(
    ("kind", "change"),
    [
        ("rules", {"frequency": 4}),  # the reference's range is 5 to 43200
        ("rules", {"frequency": None}),  # required
        ("rules", {"filterMatch": None}),  # required with filters
        ("alert-rules", {"dataset": "events_analytics_platform"}),  # not one of the listed datasets
        ("alert-rules", {"timeWindow": 20}),
        ("saved", {"version": 2}),  # not a body parameter
        ("saved", {"queryDataset": "discover"}),  # deprecated
    ],
)
def test_the_stand_in_refuses_what_the_reference_does_not_allow(
    sentry_api: SentryApiStandIn, kind: str, change: dict[str, Any]
):
    paths = {
        "rules": f"/projects/{sentry_api.org}/{sentry_api.project}/rules/",
        "alert-rules": f"/organizations/{sentry_api.org}/alert-rules/",
        "saved": f"/organizations/{sentry_api.org}/discover/saved/",
    }
    valid = _valid_body(sentry_api, kind)
    changed = {key: value for key, value in {**valid, **change}.items() if value is not None}

    def post(body: dict[str, Any]) -> requests.Response:
        headers = {"Authorization": f"Bearer {sentry_api.token}"}
        return requests.post(f"{sentry_api.url}/api/0{paths[kind]}", json=body, headers=headers, timeout=5)

    assert post(valid).status_code == 201
    assert post(changed).status_code == 400
