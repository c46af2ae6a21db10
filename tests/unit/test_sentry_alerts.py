"""deploy/sentry stays true to the error table and to what events carry: every error type of severity critical or
high is watched by an alert, and no alert, widget or query names an error type, tag or setting that does not
exist (such a rule would never fire, and nobody would notice). The README and docs describe the alerts as they are,
and the settings `callctl sentry` reads are checked when read."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sentry_sdk.consts import OP

from shared.cli.sentry import SENTRY_TOKEN_SCOPES
from shared.cli.sentry_definitions import (
    DEFINITIONS_DIR,
    DefinitionError,
    Definitions,
    for_project,
    load_definitions,
)
from shared.core.config import Settings
from shared.core.errors import ERROR_TABLE, Capture, ErrorType, Severity
from shared.core.models import Call
from shared.messaging.topology import DISPATCH_QUEUE
from shared.observability.sentry import ID_TAGS
from tests.support.processes import REPO

TAGGED_EVENT_FILTER = "sentry.rules.filters.tagged_event.TaggedEventFilter"
# Fields Sentry itself gives events, transactions and spans; anything else a query names must be one of our tags.
SENTRY_FIELDS = {
    "event.type",
    "title",
    "transaction",
    "transaction.op",
    "transaction.duration",
    "span.op",
    "span.duration",
    "messaging.destination.name",
    "messaging.message.receive.latency",
}
SDK_OPS = {value for name, value in vars(OP).items() if name.isupper()}  # the ops the SDK and its integrations use
TERM = re.compile(r"(?P<negated>!?)(?P<key>[\w.]+):(?P<value>\[[^\]]*\]|\S+)")
FUNCTION = re.compile(r"^(?P<name>\w+)\((?P<argument>[\w.]*)\)$")
THRESHOLD_SETTINGS_PREFIX = "sentry_alert_"
TARGET_SETTINGS = {"sentry_alert_email", "sentry_alert_slack_workspace", "sentry_alert_slack_channel"}
EVENT_FREQUENCY = "sentry.rules.conditions.event_frequency.EventFrequencyCondition"
DOCS_SECTION = "Alerts, dashboard and queries as code"


@pytest.fixture(scope="module")
def definitions() -> Definitions:
    return load_definitions(Settings())


def _event_tags() -> set[str]:
    """The tags events carry: the ids of `ID_TAGS`, those set by name anywhere in the code, and a call's."""
    sources = [*REPO.glob("shared/**/*.py"), *REPO.glob("services/**/*.py")]
    named = {match for path in sources for match in re.findall(r"set_tag\(\s*\"(\w+)\"", path.read_text())}
    return set(ID_TAGS) | named | set(Call(campaign_id=uuid.uuid4()).kind_tags)


def _queries(definitions: Definitions) -> list[str]:
    return (
        [rule["query"] for rule in definitions.metric_alerts]
        + [query["conditions"] for board in definitions.dashboards for w in board["widgets"] for query in w["queries"]]
        + [query["query"] for query in definitions.saved_queries]
    )


def _columns(definitions: Definitions) -> list[str]:
    widget_queries = [query for board in definitions.dashboards for w in board["widgets"] for query in w["queries"]]
    return (
        [rule["aggregate"] for rule in definitions.metric_alerts]
        + [name for query in widget_queries for key in ("fields", "aggregates", "columns") for name in query[key]]
        + [name for query in definitions.saved_queries for name in query["fields"]]
    )


def _terms(query: str) -> list[tuple[str, list[str]]]:
    """`key:value` and `key:[a,b]` terms of a search query; `has:key` names the key."""
    terms = []
    for match in TERM.finditer(query):
        key, value = match["key"], match["value"].strip("[]").split(",")
        terms.append((value[0], []) if key == "has" else (key, value))
    return terms


def _field_names(column: str) -> list[str]:
    """The fields a column names: itself, or a function's argument (`p95(span.duration)`, `count()`)."""
    function = FUNCTION.match(column)
    if function is None:
        return [column]
    return [function["argument"]] if function["argument"] else []


def _watched(definitions: Definitions) -> set[ErrorType]:
    """The error types an alert fires for: named by `error_type`, or of a `severity` or `category` it names."""
    watched: set[ErrorType] = set()
    for rule in definitions.issue_alerts:
        for rule_filter in rule["filters"]:
            if rule_filter["id"] == TAGGED_EVENT_FILTER and rule_filter["match"] == "eq":
                watched |= _error_types_where(rule_filter["key"], rule_filter["value"])
    for rule in definitions.metric_alerts:
        for key, values in _terms(rule["query"]):
            for value in values:
                watched |= _error_types_where(key, value)
    return watched


def _error_types_where(tag: str, value: str) -> set[ErrorType]:
    if tag == "error_type":
        return {ErrorType(value)} if value in set(ErrorType) else set()
    if tag in ("severity", "category"):
        return {error_type for error_type, spec in ERROR_TABLE.items() if getattr(spec, tag) == value}
    return set()


def test_every_critical_or_high_error_type_is_watched_by_an_alert(definitions: Definitions):
    serious = {
        error_type for error_type, spec in ERROR_TABLE.items() if spec.severity in (Severity.CRITICAL, Severity.HIGH)
    }

    assert serious - _watched(definitions) == set()


def _named(definitions: Definitions, tag: str) -> list[str]:
    """The values of `tag` that issue-alert filters and queries name."""
    values = [f["value"] for rule in definitions.issue_alerts for f in rule["filters"] if f["key"] == tag]
    values += [
        value for query in _queries(definitions) for key, found in _terms(query) if key == tag for value in found
    ]
    return values


def test_alerts_widgets_and_queries_name_only_error_types_that_reach_sentry(definitions: Definitions):
    named = _named(definitions, "error_type")

    assert named
    for value in named:
        assert value in set(ErrorType), f"{value} is not in the error table"
        assert ERROR_TABLE[ErrorType(value)].capture is Capture.EVENT, f"{value} is only ever a breadcrumb"


def test_severities_and_categories_named_exist_in_the_error_table(definitions: Definitions):
    assert set(_named(definitions, "severity")) <= {spec.severity for spec in ERROR_TABLE.values()}
    assert set(_named(definitions, "category")) <= {spec.category for spec in ERROR_TABLE.values()}


def test_every_tag_or_field_named_exists(definitions: Definitions):
    known = _event_tags() | SENTRY_FIELDS
    names = [rule_filter["key"] for rule in definitions.issue_alerts for rule_filter in rule["filters"]]
    names += [key for query in _queries(definitions) for key, _ in _terms(query)]
    names += [name for column in _columns(definitions) for name in _field_names(column)]

    assert {"error_type", "severity", "user_id", "service"} <= known  # the code still sets the tags it is read for
    assert set(names) - known == set()


def test_every_operation_and_queue_named_exists(definitions: Definitions):
    code = "\n".join(path.read_text() for path in [*REPO.glob("shared/**/*.py"), *REPO.glob("services/**/*.py")])
    terms = [term for query in _queries(definitions) for term in _terms(query)]

    for key, values in terms:
        for value in values:
            if key in ("span.op", "transaction.op") and value not in SDK_OPS:
                assert f'"{value}"' in code or f"'{value}'" in code, f"no span or transaction has the op {value}"
            if key == "messaging.destination.name":
                assert value == DISPATCH_QUEUE, value


def test_thresholds_are_filled_from_settings(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SENTRY_ALERT_BOLNA_FAILURES", "17")
    monkeypatch.setenv("SENTRY_ALERT_FAILURE_RATE", "0.2")

    definitions = load_definitions(Settings())

    values = json.dumps([definitions.issue_alerts, definitions.metric_alerts])
    assert '"alertThreshold": 17' in values and '"alertThreshold": 0.2' in values
    assert "${" not in json.dumps(definitions.__dict__)


def test_every_threshold_setting_is_used_by_deploy_sentry():
    text = "".join(path.read_text() for path in DEFINITIONS_DIR.glob("*.json"))
    thresholds = [name for name in Settings.model_fields if name.startswith(THRESHOLD_SETTINGS_PREFIX)]

    assert thresholds
    for name in set(thresholds) - TARGET_SETTINGS:
        assert f"${{{name.upper()}}}" in text, f"{name.upper()} is not used by any alert"


def test_a_placeholder_that_is_not_a_setting_is_refused(tmp_path: Path):
    _copy_definitions(tmp_path)
    rules: list[dict[str, Any]] = json.loads((tmp_path / "issue-alerts.json").read_text())
    rules[0]["frequency"] = "${SENTRY_ALERT_TYPO}"
    (tmp_path / "issue-alerts.json").write_text(json.dumps(rules))

    with pytest.raises(DefinitionError, match="SENTRY_ALERT_TYPO"):
        load_definitions(Settings(), tmp_path)


def _copy_definitions(tmp_path: Path) -> None:
    for path in DEFINITIONS_DIR.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())


def test_issue_alerts_count_no_events_above_a_threshold(definitions: Definitions):
    # An issue alert's frequency condition counts the events of each issue apart, and an error type is one issue
    # per place it happens: "more than N in 5 minutes" of an error type is a metric alert's count() of events.
    for rule in definitions.issue_alerts:
        for condition in rule["conditions"]:
            if condition["id"] == EVENT_FREQUENCY:
                assert condition["value"] == 0, f"{rule['name']} counts events per issue"


def test_metric_alerts_on_error_events_count_events(definitions: Definitions):
    counting = [rule for rule in definitions.metric_alerts if rule["aggregate"] == "count()"]

    assert counting
    for rule in counting:
        assert (rule["dataset"], rule["queryType"], rule["eventTypes"]) == ("events", 0, ["error"]), rule["name"]
        assert {key for key, _ in _terms(rule["query"])} == {"error_type"}, rule["name"]


def _table_row(text: str, setting: str) -> str:
    row = re.search(rf"^\| `{setting}` \|.*$", text, re.MULTILINE)
    assert row, f"{setting} has no row"
    return row.group(0)


def _docs_section() -> str:
    doc = (REPO / "docs" / "observability.md").read_text()
    return doc.split(f"## {DOCS_SECTION}", 1)[1].split("\n## ", 1)[0]


def test_the_readme_and_docs_rows_of_a_threshold_name_the_alert_using_it():
    readme = (REPO / "README.md").read_text()
    docs = _docs_section()
    for path in DEFINITIONS_DIR.glob("*alerts.json"):
        for rule in json.loads(path.read_text()):
            for setting in re.findall(r"\$\{(\w+)\}", json.dumps(rule)):
                alert = rule["name"].removeprefix("Callflow: ")
                assert alert in _table_row(readme, setting), f"README: {setting} does not name {alert!r}"
                assert alert in _table_row(docs, setting), f"docs: {setting} does not name {alert!r}"
                assert f"| {rule['name']} |" in docs, f"docs: {rule['name']!r} has no row"


def test_the_token_scopes_are_listed_once_in_the_docs():
    scopes = [scope.strip() for scope in SENTRY_TOKEN_SCOPES.split(",")]
    applying = " ".join(_docs_section().split("### Applying", 1)[1].split("###", 1)[0].split())
    readme_row = _table_row((REPO / "README.md").read_text(), "SENTRY_AUTH_TOKEN")

    assert all(f"`{scope}`" in applying for scope in scopes)
    assert not re.search(r"`\w+:\w+`", readme_row), "README repeats the scopes"
    assert "docs/observability.md" in readme_row


def test_organization_objects_are_named_for_their_project():
    assert for_project("Callflow: error rate", "prod") == "Callflow (prod): error rate"
    assert for_project("Callflow", "callflow-staging") == "Callflow (callflow-staging)"


def test_a_name_without_the_callflow_prefix_is_refused(tmp_path: Path):
    _copy_definitions(tmp_path)
    boards: list[dict[str, Any]] = json.loads((tmp_path / "dashboards.json").read_text())
    boards[0]["title"] = "Operations"
    (tmp_path / "dashboards.json").write_text(json.dumps(boards))

    with pytest.raises(DefinitionError, match="title 'Operations' must be 'Callflow' or start with 'Callflow: '"):
        load_definitions(Settings(), tmp_path)


@pytest.mark.parametrize("url", ["sentry.io", "ftp://sentry.io", "https://", "https//sentry.io"])
def test_sentry_url_must_be_an_http_url(url: str):
    with pytest.raises(ValidationError, match=r"sentry_url\n.*must be an http\(s\) URL such as https://sentry.io"):
        Settings(sentry_url=url)


def test_sentry_url_takes_a_self_hosted_sentry():
    assert Settings(sentry_url="http://sentry.internal:9000/").sentry_url == "http://sentry.internal:9000/"


def test_the_slack_channel_must_start_with_a_hash():
    with pytest.raises(ValidationError, match=r"must start with # \(#callflow-alerts\), as Sentry stores it"):
        Settings(sentry_alert_slack_channel="callflow-alerts")

    assert Settings(sentry_alert_slack_channel="#callflow-alerts").sentry_alert_slack_channel == "#callflow-alerts"
