"""`callctl sentry`: applies deploy/sentry to a Sentry project through Sentry's public API, and records releases.

Objects are matched by name (a dashboard by title); the organization's objects (metric alerts, the dashboard, saved
queries) carry the project's slug in their names. A missing one is created, one whose managed fields differ is
updated, and an equal one is left alone, so applying twice changes nothing. Only the fields deploy/sentry sets are
compared: Sentry adds its own (ids, dates, display names) to what it returns. Nothing is deleted: objects of the
project named like ours that the files no longer hold are listed for a person to delete.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
import requests

from shared.cli import sentry_definitions
from shared.cli.sentry_definitions import (
    OUR_NAME,
    DefinitionError,
    Definitions,
    NotificationTargets,
    for_project,
    load_definitions,
)
from shared.core.config import Settings, load_settings

API_PREFIX = "/api/0"
TIMEOUT_SECONDS = (5.0, 30.0)  # connect, read
# One scope each endpoint lists suffices: project:read (the project, issue alerts), alerts:write (writing alerts),
# org:read (metric alerts, dashboards, saved queries, integrations), member:read (members), project:releases.
SENTRY_TOKEN_SCOPES = "project:read, alerts:write, org:read, member:read, project:releases"


class SentryRequestFailed(Exception):
    """Sentry refused a request, or did not answer it."""

    def __init__(self, method: str, path: str, problem: str):
        super().__init__(f"Sentry API request {method} {path} failed: {problem}")


class SentryApi:
    """Sentry's public API (https://docs.sentry.io/api/) with an auth token."""

    def __init__(self, base_url: str, token: str):
        self._base = base_url.rstrip("/")
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {token}"

    def get(self, path: str) -> Any:
        return _body("GET", path, self._request("GET", path))

    def get_all(self, path: str) -> Iterator[dict[str, Any]]:
        """Every item of a list endpoint, following the `Link` header's next cursor while it has results."""
        url: str | None = f"{self._base}{API_PREFIX}{path}"
        while url is not None:
            response = self._request("GET", path, url=url)
            yield from _body("GET", path, response)
            following = response.links.get("next", {})
            url = following.get("url") if following.get("results") == "true" else None

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return _body("POST", path, self._request("POST", path, body))

    def put(self, path: str, body: dict[str, Any]) -> Any:
        return _body("PUT", path, self._request("PUT", path, body))

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None, url: str | None = None
    ) -> requests.Response:
        try:
            response = self._session.request(
                method, url or f"{self._base}{API_PREFIX}{path}", json=body, timeout=TIMEOUT_SECONDS
            )
        except requests.RequestException as exc:
            raise SentryRequestFailed(method, path, f"no answer from {self._base} ({type(exc).__name__})") from exc
        if response.status_code >= 400:
            raise SentryRequestFailed(method, path, f"{response.status_code} {_detail(response)}")
        return response


def _body(method: str, path: str, response: requests.Response) -> Any:
    """The answer's JSON. A proxy in front of Sentry (a single sign-on login page) can answer 200 with HTML."""
    try:
        return response.json()
    except ValueError as exc:
        kind = response.headers.get("Content-Type") or "no content type"
        raise SentryRequestFailed(
            method, path, f"{response.status_code} answer is not JSON ({kind}); is SENTRY_URL Sentry itself?"
        ) from exc


def _detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.reason or ""
    return str(body.get("detail", body)) if isinstance(body, dict) else str(body)


@dataclass(frozen=True)
class Kind:
    """One kind of object and where Sentry's API keeps it."""

    label: str
    collection: str  # the list endpoint; an object is at collection + its id + "/"
    key: str  # the field objects are matched by
    of_organization: bool  # True: the organization's, given to one project by its `projects` field
    listed_in_full: bool = True  # False: the list holds summaries, and each object is read on its own


@dataclass
class Outcome:
    """What an apply did, so a failure can say what was already changed."""

    dry_run: bool
    done: list[str] = field(default_factory=list)  # the writes made
    differing: int = 0  # the objects created or updated, or with --dry-run that would be
    unchanged: int = 0
    unmanaged: list[str] = field(default_factory=list)  # the project's objects named like ours, not in the files

    def summary(self) -> str:
        if not self.done:
            return "nothing was changed"
        return "already applied: " + "; ".join(self.done) + "; the rest was not applied"


@click.group()
def sentry() -> None:
    """Sentry's alert rules, dashboard and saved queries (deploy/sentry), and releases."""


@sentry.command("apply")
@click.option("--org", required=True, help="The organization's slug.")
@click.option("--project", required=True, help="The project's slug.")
@click.option("--dry-run", is_flag=True, help="Print what would change as a diff; change nothing.")
@click.option(
    "--definitions",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="The directory of the definition files.  [default: deploy/sentry of the checkout]",
)
def apply_command(org: str, project: str, dry_run: bool, directory: Path | None) -> None:
    """Create or update the issue alerts, metric alerts, dashboard and saved queries of deploy/sentry."""
    settings = load_settings()
    try:
        definitions = load_definitions(settings, directory or sentry_definitions.DEFINITIONS_DIR)
    except DefinitionError as exc:
        raise click.UsageError(str(exc)) from exc
    api = _api(settings)
    outcome = Outcome(dry_run)
    try:
        apply(api, org, project, definitions, _targets(api, org, settings), outcome)
    except SentryRequestFailed as exc:
        raise click.ClickException(
            f"{exc}; {outcome.summary()} (apply again once fixed: what is applied is left alone)"
        ) from exc
    if outcome.unmanaged:
        click.echo(f"not in deploy/sentry: {'; '.join(outcome.unmanaged)}; delete by hand if unwanted")
    verb = "to change (dry run: nothing was changed)" if dry_run else "changed"
    click.echo(f"{outcome.differing} object(s) {verb}, {outcome.unchanged} unchanged")


@sentry.command("release")
@click.option("--org", required=True, help="The organization's slug.")
@click.option("--project", required=True, help="The project's slug.")
@click.option("--version", "version", required=True, help="The release: the image's git SHA (SENTRY_RELEASE).")
@click.option("--environment", help="Mark a deploy of the release to this environment.  [default: SENTRY_ENVIRONMENT]")
@click.option("--repository", help="The repository's name in Sentry's integration (for suspect commits).")
@click.option("--commit", help="The commit the release was built from.")
def release_command(
    org: str, project: str, version: str, environment: str | None, repository: str | None, commit: str | None
) -> None:
    """Create the release for the project, and mark its deploy to an environment."""
    if (repository is None) != (commit is None):
        raise click.UsageError("pass --repository and --commit together")
    settings = load_settings()
    api = _api(settings)
    environment = environment or settings.sentry_environment
    body: dict[str, Any] = {"version": version, "projects": [project]}
    if repository is not None:
        body["refs"] = [{"repository": repository, "commit": commit}]
    releases = f"/organizations/{org}/releases/"
    try:
        api.post(releases, body)
        click.echo(f"release {version} recorded for {project}")
        api.post(f"{releases}{quote(version, safe='')}/deploys/", {"environment": environment})
    except SentryRequestFailed as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"deploy of {version} to {environment} marked")


def _api(settings: Settings) -> SentryApi:
    if not settings.sentry_auth_token:
        raise click.UsageError(f"SENTRY_AUTH_TOKEN must be set (scopes: {SENTRY_TOKEN_SCOPES})")
    return SentryApi(settings.sentry_url, settings.sentry_auth_token)


def _targets(api: SentryApi, org: str, settings: Settings) -> NotificationTargets:
    """The ids Sentry knows the notification targets by; an alert without a target would notify no one."""
    workspace, channel = settings.sentry_alert_slack_workspace, settings.sentry_alert_slack_channel
    if bool(workspace) != bool(channel):
        raise click.UsageError("set SENTRY_ALERT_SLACK_WORKSPACE and SENTRY_ALERT_SLACK_CHANNEL together")
    if not settings.sentry_alert_email and not workspace:
        raise click.UsageError(
            "set SENTRY_ALERT_EMAIL, or SENTRY_ALERT_SLACK_WORKSPACE and SENTRY_ALERT_SLACK_CHANNEL: "
            "an alert without a target notifies no one"
        )
    try:
        user_id = _member_user_id(api, org, settings.sentry_alert_email) if settings.sentry_alert_email else None
        integration_id = _slack_integration_id(api, org, workspace) if workspace else None
    except SentryRequestFailed as exc:
        raise click.ClickException(f"{exc}; nothing was changed") from exc
    return NotificationTargets(user_id, integration_id, channel or None)


def _member_user_id(api: SentryApi, org: str, email: str) -> str:
    for member in api.get_all(f"/organizations/{org}/members/"):
        if str(member.get("email", "")).lower() == email.lower() and member.get("user"):
            return str(member["user"]["id"])
    raise click.UsageError(f"SENTRY_ALERT_EMAIL: {email} is not a member of the organization {org}")


def _slack_integration_id(api: SentryApi, org: str, workspace: str) -> str:
    for integration in api.get_all(f"/organizations/{org}/integrations/?providerKey=slack"):
        if integration.get("name") == workspace:
            return str(integration["id"])
    raise click.UsageError(f"SENTRY_ALERT_SLACK_WORKSPACE: the organization {org} has no Slack workspace {workspace}")


def apply(
    api: SentryApi, org: str, project: str, definitions: Definitions, targets: NotificationTargets, outcome: Outcome
) -> None:
    project_id = int(api.get(f"/projects/{org}/{project}/")["id"])
    issue_actions, metric_actions = targets.issue_alert_actions(), targets.metric_alert_actions()
    plans: list[tuple[Kind, list[dict[str, Any]]]] = [
        (
            Kind("issue alert", f"/projects/{org}/{project}/rules/", "name", of_organization=False),
            [{**rule, "actions": issue_actions} for rule in definitions.issue_alerts],
        ),
        (
            Kind("metric alert", f"/organizations/{org}/alert-rules/", "name", of_organization=True),
            [_metric_alert(rule, project, metric_actions) for rule in definitions.metric_alerts],
        ),
        (
            Kind("dashboard", f"/organizations/{org}/dashboards/", "title", of_organization=True, listed_in_full=False),
            [_owned(board, "title", project, project_id) for board in definitions.dashboards],
        ),
        (
            Kind("saved query", f"/organizations/{org}/discover/saved/", "name", of_organization=True),
            [_owned(query, "name", project, project_id) for query in definitions.saved_queries],
        ),
    ]
    for kind, wanted in plans:
        _apply_kind(api, kind, wanted, outcome, (project, project_id))


def _metric_alert(rule: dict[str, Any], project: str, actions: list[dict[str, Any]]) -> dict[str, Any]:
    triggers = [{**trigger, "actions": actions} for trigger in rule["triggers"]]
    return {**rule, "name": for_project(rule["name"], project), "triggers": triggers, "projects": [project]}


def _owned(item: dict[str, Any], key: str, project: str, project_id: int) -> dict[str, Any]:
    return {**item, key: for_project(item[key], project), "projects": [project_id]}


def _apply_kind(
    api: SentryApi, kind: Kind, wanted: list[dict[str, Any]], outcome: Outcome, project: tuple[str, int]
) -> None:
    existing = {item[kind.key]: item for item in api.get_all(kind.collection)}
    _note_unmanaged(api, kind, existing, {desired[kind.key] for desired in wanted}, project, outcome)
    for desired in wanted:
        name = desired[kind.key]
        found = existing.get(name)
        if found is not None and not kind.listed_in_full:
            found = api.get(f"{kind.collection}{found['id']}/")
        current = _managed(desired, found) if found is not None else None
        if current is not None and _normal(current) == _normal(desired):
            outcome.unchanged += 1
            continue
        outcome.differing += 1
        if outcome.dry_run:
            click.echo(_diff(kind, name, current, desired), nl=False)
            continue
        write: Callable[[str, dict[str, Any]], Any] = api.post if found is None else api.put
        write(kind.collection if found is None else f"{kind.collection}{found['id']}/", desired)
        what = f"{'created' if found is None else 'updated'} {kind.label} {name!r}"
        click.echo(what)
        outcome.done.append(what)


def _note_unmanaged(
    api: SentryApi,
    kind: Kind,
    existing: dict[str, dict[str, Any]],
    wanted: set[str],
    project: tuple[str, int],
    outcome: Outcome,
) -> None:
    """Objects of the project named like ours that the files do not hold: renamed or removed ones. They may have
    been made by hand, so they are reported, not deleted."""
    for name, item in existing.items():
        if name in wanted or not OUR_NAME.match(name):
            continue
        if kind.of_organization:
            if not kind.listed_in_full:
                item = api.get(f"{kind.collection}{item['id']}/")
            # Another project's objects are named like ours too; the projects field says whose it is.
            if [str(one) for one in item.get("projects") or []] not in ([project[0]], [str(project[1])]):
                continue
        outcome.unmanaged.append(f"{kind.label} {name!r}")


def _managed(desired: Any, actual: Any) -> Any:
    """The part of what Sentry returned that deploy/sentry manages: the keys the desired object has, all the way
    down (Sentry adds ids, dates and display names to the objects, conditions and actions it returns)."""
    if isinstance(desired, dict):
        source = actual if isinstance(actual, dict) else {}
        return {key: _managed(value, source.get(key)) for key, value in desired.items()}
    if isinstance(desired, list) and isinstance(actual, list) and len(desired) == len(actual):
        return [_managed(want, have) for want, have in zip(desired, actual, strict=True)]
    return actual


def _normal(value: Any) -> Any:
    """Sentry returns some numbers as strings and thresholds as floats: 5, 5.0 and "5" are one value."""
    if isinstance(value, dict):
        return {key: _normal(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_normal(item) for item in value]
    if isinstance(value, str):
        try:
            return _normal(float(value))
        except ValueError:
            return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _diff(kind: Kind, name: str, current: Any, desired: Any) -> str:
    def lines(value: Any) -> list[str]:
        if value is None:
            return []
        return (json.dumps(_normal(value), indent=2, sort_keys=True) + "\n").splitlines(keepends=True)

    return "".join(
        difflib.unified_diff(
            lines(current), lines(desired), f"sentry: {kind.label} {name!r}", f"deploy/sentry: {kind.label} {name!r}"
        )
    )
