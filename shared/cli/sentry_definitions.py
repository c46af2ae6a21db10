"""The Sentry setup kept in deploy/sentry: alert rules, the dashboard and saved queries, as Sentry's API takes them.

A value written `${NAME}` in those files is the setting NAME (a threshold); the whole value is replaced by the
setting's value, keeping its type. Notification actions are not in the files: they are built from the
SENTRY_ALERT_* targets that are set, once their ids are known (`NotificationTargets`).

Every name (a dashboard's title) is `Callflow` or starts with `Callflow: `. Metric alerts, dashboards and saved
queries belong to the organization, not to a project, so their names get the project's slug (`Callflow (prod): `,
`for_project`): otherwise applying to a second project would find the first one's objects by name and move them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.core.config import Settings

# Next to the code in a checkout; an installed package (the image) has no deploy/ directory.
DEFINITIONS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "sentry"
ISSUE_ALERTS_FILE = "issue-alerts.json"
METRIC_ALERTS_FILE = "metric-alerts.json"
DASHBOARDS_FILE = "dashboards.json"
SAVED_QUERIES_FILE = "saved-queries.json"
PLACEHOLDER = re.compile(r"^\$\{([A-Z0-9_]+)\}$")
NAME_PREFIX = "Callflow"
# The names apply gives its objects, with or without a project's slug: `Callflow`, `Callflow: x`,
# `Callflow (prod)`, `Callflow (prod): x`.
OUR_NAME = re.compile(r"^Callflow(?: \([^)]*\))?(?::|$)")
NAME_KEYS = {
    ISSUE_ALERTS_FILE: "name",
    METRIC_ALERTS_FILE: "name",
    DASHBOARDS_FILE: "title",
    SAVED_QUERIES_FILE: "name",
}

EMAIL_ISSUE_ACTION = "sentry.mail.actions.NotifyEmailAction"
SLACK_ISSUE_ACTION = "sentry.integrations.slack.notify_action.SlackNotifyServiceAction"
SLACK_MESSAGE_TAGS = "error_type,severity,service"  # shown in each Slack message of an issue alert


class DefinitionError(ValueError):
    """A file of deploy/sentry is missing, is not JSON, names a setting that does not exist, or an object whose name
    does not start with `Callflow`."""


@dataclass(frozen=True)
class NotificationTargets:
    """Who is notified, as Sentry's ids: the member's user id and the Slack integration's id."""

    email_user_id: str | None = None
    slack_integration_id: str | None = None
    slack_channel: str | None = None

    def issue_alert_actions(self) -> list[dict[str, Any]]:
        actions: list[dict[str, Any]] = []
        if self.email_user_id:
            actions.append(
                {
                    "id": EMAIL_ISSUE_ACTION,
                    "targetType": "Member",
                    "targetIdentifier": int(self.email_user_id),
                    "fallthroughType": "ActiveMembers",
                }
            )
        if self.slack_integration_id:
            actions.append(
                {
                    "id": SLACK_ISSUE_ACTION,
                    "workspace": int(self.slack_integration_id),  # the integration's id, a number
                    "channel": self.slack_channel,
                    "tags": SLACK_MESSAGE_TAGS,
                }
            )
        return actions

    def metric_alert_actions(self) -> list[dict[str, Any]]:
        actions: list[dict[str, Any]] = []
        if self.email_user_id:
            actions.append({"type": "email", "targetType": "user", "targetIdentifier": self.email_user_id})
        if self.slack_integration_id:
            actions.append(
                {
                    "type": "slack",
                    "targetType": "specific",
                    "targetIdentifier": self.slack_channel,
                    "integrationId": int(self.slack_integration_id),
                }
            )
        return actions


@dataclass(frozen=True)
class Definitions:
    """Every object `callctl sentry apply` manages, with thresholds filled in and without project or actions."""

    issue_alerts: list[dict[str, Any]]
    metric_alerts: list[dict[str, Any]]
    dashboards: list[dict[str, Any]]
    saved_queries: list[dict[str, Any]]


def for_project(name: str, project: str) -> str:
    """`Callflow: x` as the project's: `Callflow (prod): x`."""
    return f"{NAME_PREFIX} ({project}){name.removeprefix(NAME_PREFIX)}"


def load_definitions(settings: Settings, directory: Path = DEFINITIONS_DIR) -> Definitions:
    if not directory.is_dir():
        raise DefinitionError(
            f"{directory} is not a directory: run from a checkout of Callflow (deploy/sentry) or pass --definitions DIR"
        )
    return Definitions(
        issue_alerts=_load(directory / ISSUE_ALERTS_FILE, settings),
        metric_alerts=_load(directory / METRIC_ALERTS_FILE, settings),
        dashboards=_load(directory / DASHBOARDS_FILE, settings),
        saved_queries=_load(directory / SAVED_QUERIES_FILE, settings),
    )


def _load(path: Path, settings: Settings) -> list[dict[str, Any]]:
    try:
        objects = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DefinitionError(f"{path} is missing") from exc
    except ValueError as exc:
        raise DefinitionError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(objects, list) or not all(isinstance(item, dict) for item in objects):
        raise DefinitionError(f"{path} must hold a JSON list of objects")
    key = NAME_KEYS[path.name]
    for item in objects:
        name = item.get(key)
        if not isinstance(name, str) or not (name == NAME_PREFIX or name.startswith(f"{NAME_PREFIX}: ")):
            raise DefinitionError(f"{path}: {key} {name!r} must be {NAME_PREFIX!r} or start with '{NAME_PREFIX}: '")
    return [_filled(item, settings, path) for item in objects]


def _filled(value: Any, settings: Settings, path: Path) -> Any:
    if isinstance(value, dict):
        return {key: _filled(item, settings, path) for key, item in value.items()}
    if isinstance(value, list):
        return [_filled(item, settings, path) for item in value]
    match = PLACEHOLDER.match(value) if isinstance(value, str) else None
    if match is None:
        return value
    name = match.group(1)
    if name.lower() not in Settings.model_fields:
        raise DefinitionError(f"{path} names ${{{name}}}, which is not a setting")
    return getattr(settings, name.lower())
