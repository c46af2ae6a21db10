"""A stand-in for the part of Sentry's public API (https://docs.sentry.io/api/) that `callctl sentry` uses.

It keeps objects in memory, answers with the status codes and shapes the reference shows (ids as strings, list
summaries for dashboards, `Link` header pagination), checks each token's scopes against the scopes each endpoint
lists, validates every payload against the reference's body parameters (a 400 names the field) and records each
request. Endpoints, under /api/0, each with its page of the reference:

- GET /projects/{org}/{project}/ — https://docs.sentry.io/api/projects/retrieve-a-project/
- GET /projects/{org}/{project}/rules/ — https://docs.sentry.io/api/alerts/list-a-projects-issue-alert-rules/
- POST /projects/{org}/{project}/rules/ — https://docs.sentry.io/api/alerts/create-an-issue-alert-rule-for-a-project/
- PUT /projects/{org}/{project}/rules/{rule_id}/ — https://docs.sentry.io/api/alerts/update-an-issue-alert-rule/
- GET /organizations/{org}/alert-rules/ —
  https://docs.sentry.io/api/alerts/list-an-organizations-metric-alert-rules/
- POST /organizations/{org}/alert-rules/ —
  https://docs.sentry.io/api/alerts/create-a-metric-alert-rule-for-an-organization/
- PUT /organizations/{org}/alert-rules/{alert_rule_id}/ — https://docs.sentry.io/api/alerts/update-a-metric-alert-rule/
- GET /organizations/{org}/dashboards/ —
  https://docs.sentry.io/api/dashboards/list-an-organizations-custom-dashboards/
- POST /organizations/{org}/dashboards/ —
  https://docs.sentry.io/api/dashboards/create-a-new-dashboard-for-an-organization/
- GET /organizations/{org}/dashboards/{dashboard_id}/ —
  https://docs.sentry.io/api/dashboards/retrieve-an-organizations-custom-dashboard/
- PUT /organizations/{org}/dashboards/{dashboard_id}/ —
  https://docs.sentry.io/api/dashboards/edit-an-organizations-custom-dashboard/
- GET /organizations/{org}/discover/saved/ —
  https://docs.sentry.io/api/discover/list-an-organizations-discover-saved-queries/
- POST /organizations/{org}/discover/saved/ — https://docs.sentry.io/api/discover/create-a-new-saved-query/
- PUT /organizations/{org}/discover/saved/{query_id}/ —
  https://docs.sentry.io/api/discover/edit-an-organizations-discover-saved-query/
- GET /organizations/{org}/members/ — https://docs.sentry.io/api/organizations/list-an-organizations-members/
- GET /organizations/{org}/integrations/?providerKey=slack —
  https://docs.sentry.io/api/integrations/list-an-organizations-available-integrations/
- POST /organizations/{org}/releases/ —
  https://docs.sentry.io/api/releases/create-a-new-release-for-an-organization/
- POST /organizations/{org}/releases/{version}/deploys/ —
  https://docs.sentry.io/api/releases/create-a-new-deploy-for-an-organization/

Pagination: https://docs.sentry.io/api/pagination/. Auth tokens and scopes: https://docs.sentry.io/api/auth/ and
https://docs.sentry.io/api/permissions/.

The organization has the project `project` and any of `other_projects` (slug: id); issue alerts are kept per
project (`rules` holds `project`'s, `project_rules` every project's), the organization's objects in one store each.

A body field the reference does not list is refused here. Sentry ignores it instead, which would make an apply
compare a field Sentry never stores, and update the object on every run.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

CREATED = "2026-01-01T00:00:00Z"
CREATOR = {"id": "1", "name": "Stand-in", "email": "stand-in@example.com"}

# Issue alerts: the conditions, filters and actions "Create an Issue Alert Rule for a Project" lists (those used).
FREQUENCY_INTERVALS = {"1m", "5m", "15m", "1h", "1d", "1w", "30d"}
PERCENT_INTERVALS = {"5m", "10m", "30m", "1h"}
ISSUE_CONDITIONS: dict[str, set[str] | None] = {  # the condition and its `interval` values; None: no value
    "sentry.rules.conditions.first_seen_event.FirstSeenEventCondition": None,
    "sentry.rules.conditions.regression_event.RegressionEventCondition": None,
    "sentry.rules.conditions.event_frequency.EventFrequencyCondition": FREQUENCY_INTERVALS,
    "sentry.rules.conditions.event_frequency.EventUniqueUserFrequencyCondition": FREQUENCY_INTERVALS,
    "sentry.rules.conditions.event_frequency.EventFrequencyPercentCondition": PERCENT_INTERVALS,
}
TAGGED_EVENT_FILTER = "sentry.rules.filters.tagged_event.TaggedEventFilter"
TAG_MATCHES = {"eq", "ne", "sw", "ew", "co", "nc", "is", "ns"}
VALUELESS_MATCHES = {"is", "ns"}
EMAIL_ACTION = "sentry.mail.actions.NotifyEmailAction"
SLACK_ACTION = "sentry.integrations.slack.notify_action.SlackNotifyServiceAction"
MATCHES = {"all", "any", "none"}
ISSUE_ALERT_FIELDS = {
    "name",
    "frequency",
    "actionMatch",
    "conditions",
    "actions",
    "environment",
    "owner",
    "filterMatch",
    "filters",
}

# Metric alerts.
METRIC_DATASETS = {"events", "transactions", "metrics", "sessions", "generic-metrics"}
METRIC_FUNCTIONS = {
    "count",
    "count_unique",
    "percentage",
    "avg",
    "apdex",
    "failure_rate",
    "p50",
    "p75",
    "p95",
    "p99",
    "p100",
    "percentile",
}
EVENT_TYPES = {"default", "error", "transaction"}
DEFAULT_QUERY_TYPES = {"events": 0, "transactions": 1}  # otherwise 2
TIME_WINDOWS = {1, 5, 10, 15, 30, 60, 120, 240, 1440}
METRIC_ACTION_TYPES = {"email", "slack", "msteams", "pagerduty", "sentry_app", "sentry_notification", "opsgenie"}
METRIC_TARGET_TYPES = {"specific", "user", "team", "sentry_app"}
METRIC_ALERT_FIELDS = {
    "name",
    "aggregate",
    "timeWindow",
    "projects",
    "query",
    "thresholdType",
    "triggers",
    "environment",
    "dataset",
    "queryType",
    "eventTypes",
    "comparisonDelta",
    "resolveThreshold",
    "owner",
}
TRIGGER_FIELDS = {"label", "alertThreshold", "actions"}
METRIC_ACTION_FIELDS = {
    "type",
    "targetType",
    "targetIdentifier",
    "inputChannelId",
    "integrationId",
    "sentryAppId",
    "priority",
}

# Dashboards: the widget layout is a 6-column grid.
DISPLAY_TYPES = {
    "line",
    "area",
    "bar",
    "table",
    "big_number",
    "details",
    "categorical_bar",
    "wheel",
    "rage_and_dead_clicks",
    "server_tree",
    "text",
    "agents_traces_table",
}
WIDGET_TYPES = {
    "discover",
    "issue",
    "metrics",
    "error-events",
    "transaction-like",
    "spans",
    "logs",
    "tracemetrics",
    "preprod-app-size",
    None,
}
GRID_COLUMNS = 6
DASHBOARD_FIELDS = {
    "title",
    "id",
    "widgets",
    "projects",
    "environment",
    "period",
    "start",
    "end",
    "filters",
    "utc",
    "permissions",
    "isFavorited",
}
WIDGET_FIELDS = {
    "id",
    "title",
    "description",
    "thresholds",
    "displayType",
    "interval",
    "queries",
    "widgetType",
    "limit",
    "layout",
    "axisRange",
    "legendType",
}
WIDGET_QUERY_FIELDS = {
    "id",
    "fields",
    "aggregates",
    "columns",
    "fieldAliases",
    "name",
    "conditions",
    "orderby",
    "isHidden",
    "onDemandExtraction",
    "onDemandExtractionDisabled",
    "selectedAggregate",
    "linkedDashboards",
}

# Discover saved queries: `discover` is listed but deprecated; the allowed values are these.
QUERY_DATASETS = {"error-events", "transaction-like"}
QUERY_DISPLAYS = {"default", "previous", "top5", "daily", "dailytop5", "bar"}
MAX_QUERY_FIELDS = 20
SAVED_QUERY_FIELDS = {
    "name",
    "projects",
    "queryDataset",
    "start",
    "end",
    "range",
    "fields",
    "orderby",
    "environment",
    "query",
    "yAxis",
    "display",
    "topEvents",
    "interval",
}

RELEASE_FIELDS = {"version", "projects", "ref", "url", "dateReleased", "commits", "refs"}
REF_FIELDS = {"repository", "commit", "previousCommit"}
DEPLOY_FIELDS = {"environment", "name", "url", "dateStarted", "dateFinished", "projects"}
MAX_NAME = 256
MAX_TITLE = 255
MAX_ENVIRONMENT = 64

# The scopes each endpoint accepts (any one of them), as its "Scopes" section lists them.
PROJECT_READ = frozenset({"project:admin", "project:read", "project:write"})
ISSUE_ALERTS_READ = frozenset({"alerts:read", "alerts:write", *PROJECT_READ})
ISSUE_ALERTS_WRITE = frozenset({"alerts:write", "project:admin", "project:write"})
METRIC_ALERTS_READ = frozenset({"alerts:read", "org:admin", "org:read", "org:write"})
METRIC_ALERTS_CREATE = frozenset({"alerts:write", "org:admin", "org:read", "org:write"})
METRIC_ALERTS_UPDATE = frozenset({"alerts:write", "org:admin", "org:write"})
ORG_ANY = frozenset({"org:admin", "org:read", "org:write"})
MEMBERS_READ = frozenset({"member:admin", "member:read", "member:write"})
INTEGRATIONS_READ = frozenset({"org:admin", "org:integrations", "org:read", "org:write"})
RELEASES_WRITE = frozenset({"project:releases"})
DEPLOYS_WRITE = frozenset({"org:ci", "project:admin", "project:releases", "project:write"})
EVERY_SCOPE = frozenset().union(ISSUE_ALERTS_READ, METRIC_ALERTS_CREATE, MEMBERS_READ, INTEGRATIONS_READ, DEPLOYS_WRITE)


class Invalid(Exception):
    """A payload Sentry would refuse with 400."""


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int


@dataclass
class Failure:
    method: str
    path_contains: str
    status: int
    html: bool = False  # answer a login page, as a single sign-on proxy in front of Sentry does


@dataclass(frozen=True)
class Scopes:
    """What a method on a route needs: one of the scopes listed for it."""

    read: frozenset[str]
    create: frozenset[str] = frozenset()
    update: frozenset[str] = frozenset()

    def needed(self, method: str) -> frozenset[str]:
        return {"GET": self.read, "POST": self.create, "PUT": self.update}.get(method, frozenset())


@dataclass
class SentryApiStandIn:
    token: str = "stand-in-token"
    scopes: frozenset[str] = EVERY_SCOPE  # the token's
    org: str = "callflow"
    project: str = "callflow-prod"
    project_id: int = 4506
    other_projects: dict[str, int] = field(default_factory=dict)
    page_size: int = 100
    members: list[dict[str, Any]] = field(default_factory=list)
    integrations: list[dict[str, Any]] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    alert_rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    saved_queries: dict[str, dict[str, Any]] = field(default_factory=dict)
    releases: dict[str, dict[str, Any]] = field(default_factory=dict)
    url: str = ""

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.project_ids = {self.project: self.project_id, **self.other_projects}
        self.project_rules = {slug: self.rules if slug == self.project else {} for slug in self.project_ids}
        o = f"/api/0/organizations/{self.org}"
        rules = Scopes(ISSUE_ALERTS_READ, ISSUE_ALERTS_WRITE, ISSUE_ALERTS_WRITE)
        alerts = Scopes(METRIC_ALERTS_READ, METRIC_ALERTS_CREATE, METRIC_ALERTS_UPDATE)
        org = Scopes(ORG_ANY, ORG_ANY, ORG_ANY)
        rule, alert, board, query = self._valid_rule, self._valid_alert_rule, self._valid_dashboard, self._valid_query
        project_routes = []
        for slug, store in self.project_rules.items():
            p, rule_view = f"/api/0/projects/{self.org}/{slug}", functools.partial(_rule_view, project=slug)
            project = functools.partial(self._project, slug=slug)
            project_routes += [
                Rule(f"{p}/", endpoint=(Scopes(PROJECT_READ), project), methods=["GET"]),
                Rule(f"{p}/rules/", endpoint=(rules, self._collection(store, rule, rule_view))),
                Rule(f"{p}/rules/<int:oid>/", endpoint=(rules, self._item(store, rule, rule_view))),
            ]
        self._routes = Map(
            [
                *project_routes,
                Rule(f"{o}/alert-rules/", endpoint=(alerts, self._collection(self.alert_rules, alert, self._alert))),
                Rule(
                    f"{o}/alert-rules/<int:oid>/",
                    endpoint=(alerts, self._item(self.alert_rules, alert, self._alert)),
                ),
                Rule(
                    f"{o}/dashboards/",
                    endpoint=(org, self._collection(self.dashboards, board, _dashboard, _summary, unique="title")),
                ),
                Rule(f"{o}/dashboards/<int:oid>/", endpoint=(org, self._item(self.dashboards, board, _dashboard))),
                Rule(f"{o}/discover/saved/", endpoint=(org, self._collection(self.saved_queries, query, _query))),
                Rule(f"{o}/discover/saved/<int:oid>/", endpoint=(org, self._item(self.saved_queries, query, _query))),
                Rule(f"{o}/members/", endpoint=(Scopes(MEMBERS_READ), self._members), methods=["GET"]),
                Rule(f"{o}/integrations/", endpoint=(Scopes(INTEGRATIONS_READ), self._integrations), methods=["GET"]),
                Rule(f"{o}/releases/", endpoint=(Scopes(frozenset(), RELEASES_WRITE), self._release), methods=["POST"]),
                Rule(
                    f"{o}/releases/<version>/deploys/",
                    endpoint=(Scopes(frozenset(), DEPLOYS_WRITE), self._deploy),
                    methods=["POST"],
                ),
            ]
        )

    @property
    def writes(self) -> list[Recorded]:
        return [request for request in self.requests if request.method != "GET"]

    @property
    def rejected(self) -> list[Recorded]:
        """Requests answered 400: a payload the real API would refuse."""
        return [request for request in self.requests if request.status == 400]

    def fail(self, method: str, path_contains: str, status: int) -> None:
        """Answer `status` to every `method` request whose path contains `path_contains`."""
        self.failures.append(Failure(method, path_contains, status))

    def answer_login_page(self, method: str, path_contains: str) -> None:
        """Answer 200 with an HTML page, and do nothing, to every `method` request whose path contains
        `path_contains`."""
        self.failures.append(Failure(method, path_contains, 200, html=True))

    @contextmanager
    def running(self) -> Iterator[SentryApiStandIn]:
        server = make_server("127.0.0.1", 0, self._wsgi, threaded=True, request_handler=_QuietHandler)
        self.url = f"http://127.0.0.1:{server.server_port}"
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            thread.join()

    def _wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        request = Request(environ)
        body = request.get_json(silent=True) if request.method in ("POST", "PUT") else None
        response = self._answer(request, body)
        with self._lock:
            self.requests.append(
                Recorded(request.method, request.path, request.args.to_dict(), body, response.status_code)
            )
        return response(environ, start_response)

    def _answer(self, request: Request, body: Any) -> Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _json({"detail": "Invalid token"}, 401)
        for failure in self.failures:
            if failure.method == request.method and failure.path_contains in request.path:
                if failure.html:
                    return Response("<html><body>Sign in</body></html>", status=200, mimetype="text/html")
                return _json({"detail": f"stand-in failure {failure.status}"}, failure.status)
        try:
            (scopes, endpoint), args = self._routes.bind_to_environ(request.environ).match()
            if request.method not in ("GET", "POST", "PUT"):
                return _json({"detail": f'Method "{request.method}" not allowed.'}, 405)
            if not self.scopes & scopes.needed(request.method):
                return _json({"detail": "You do not have permission to perform this action."}, 403)
            if request.method in ("POST", "PUT") and not isinstance(body, dict):
                raise Invalid("the body must be a JSON object")
            with self._lock:
                return endpoint(request, body, **args) if request.method != "GET" else endpoint(request, **args)
        except Invalid as exc:
            return _json({"detail": str(exc)}, 400)
        except HTTPException as exc:
            return _json({"detail": exc.description}, exc.code or 500)

    def _new_id(self) -> str:
        return str(next(self._ids))

    def _collection(
        self,
        store: dict[str, dict[str, Any]],
        validate: Callable[[dict[str, Any]], None],
        view: Callable[[str, dict[str, Any]], dict[str, Any]],
        listed: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
        unique: str | None = None,
    ) -> Callable[..., Response]:
        def endpoint(request: Request, body: dict[str, Any] | None = None) -> Response:
            if request.method == "GET":
                return self._page(request, [(listed or view)(oid, item) for oid, item in store.items()])
            if request.method != "POST":
                return _json({"detail": f'Method "{request.method}" not allowed.'}, 405)
            validate(body or {})
            if unique and any(item[unique] == (body or {})[unique] for item in store.values()):
                return _json({"detail": f"A {unique} like this already exists."}, 409)
            oid = self._new_id()
            store[oid] = body or {}
            return _json(view(oid, store[oid]), 201)

        return endpoint

    def _item(
        self,
        store: dict[str, dict[str, Any]],
        validate: Callable[[dict[str, Any]], None],
        view: Callable[[str, dict[str, Any]], dict[str, Any]],
    ) -> Callable[..., Response]:
        def endpoint(request: Request, body: dict[str, Any] | None = None, *, oid: int) -> Response:
            key = str(oid)
            if key not in store:
                raise NotFound(f"no object {key}")
            if request.method == "PUT":
                validate(body or {})
                store[key] = body or {}
            elif request.method != "GET":
                return _json({"detail": f'Method "{request.method}" not allowed.'}, 405)
            return _json(view(key, store[key]))

        return endpoint

    def _page(self, request: Request, items: list[Any]) -> Response:
        """Sentry's cursor pagination: a `Link` header with a `previous` and a `next` cursor (`0:<offset>:<is
        previous>`), each saying with `results` whether its page has any."""
        size = min(int(request.args.get("per_page", self.page_size)), 100)
        offset = int(request.args.get("cursor", "0:0:0").split(":")[1])
        response = _json(items[offset : offset + size])
        links = []
        for rel, start, more, is_previous in (
            ("previous", max(offset - size, 0), offset > 0, 1),
            ("next", offset + size, offset + size < len(items), 0),
        ):
            cursor = f"0:{start}:{is_previous}"
            query = urlencode({**request.args, "cursor": cursor})
            links.append(
                f'<{self.url}{request.path}?{query}>; rel="{rel}"; results="{str(more).lower()}"; cursor="{cursor}"'
            )
        response.headers["Link"] = ", ".join(links)
        return response

    def _project(self, request: Request, slug: str) -> Response:
        return _json({"id": str(self.project_ids[slug]), "slug": slug, "name": slug})

    def _members(self, request: Request) -> Response:
        return self._page(request, self.members)

    def _integrations(self, request: Request) -> Response:
        provider = request.args.get("providerKey")
        found = [item for item in self.integrations if provider in (None, item["provider"]["key"])]
        return self._page(request, found)

    def _release(self, request: Request, body: dict[str, Any]) -> Response:
        _only(body, RELEASE_FIELDS)
        version = _required(body, "version", str)
        if not version:
            raise Invalid("version: must not be empty")
        projects = _required(body, "projects", list)
        if projects != [self.project]:
            raise Invalid(f"projects: unknown project(s) {projects}")
        for ref in _optional(body, "refs", list) or []:
            _only(ref, REF_FIELDS, "refs")
            _required(ref, "repository", str)
            _required(ref, "commit", str)
        # The reference lists 201 alone, a release that exists already included.
        self.releases.setdefault(version, {**body, "deploys": []})
        return _json({"version": version, "projects": [{"slug": self.project}], "dateCreated": CREATED}, 201)

    def _deploy(self, request: Request, body: dict[str, Any], *, version: str) -> Response:
        if version not in self.releases:
            raise NotFound(f"no release {version}")
        _only(body, DEPLOY_FIELDS)
        environment = _required(body, "environment", str)
        if not 0 < len(environment) <= MAX_ENVIRONMENT:
            raise Invalid(f"environment: 1 to {MAX_ENVIRONMENT} characters")
        self.releases[version]["deploys"].append(environment)
        deploy = {"environment": environment, "name": body.get("name"), "url": body.get("url")}
        return _json({**deploy, "dateStarted": None, "dateFinished": CREATED, "id": self._new_id()}, 201)

    def _valid_rule(self, body: dict[str, Any]) -> None:
        _only(body, ISSUE_ALERT_FIELDS)
        _name(body, "name", MAX_NAME)
        _one_of(body, "actionMatch", MATCHES)
        frequency = _required(body, "frequency", int)
        if not 5 <= frequency <= 43200:
            raise Invalid("frequency: between 5 and 43200 minutes")
        conditions = _required(body, "conditions", list)
        if not conditions:
            raise Invalid("conditions: at least one")
        for condition in conditions:
            intervals = ISSUE_CONDITIONS[_one_of(condition, "id", set(ISSUE_CONDITIONS))]
            if intervals is not None:
                kind = float if condition["id"].endswith("PercentCondition") else int
                if _required(condition, "value", kind) < 0:
                    raise Invalid("value: must not be negative")
                _one_of(condition, "interval", intervals)
        filters = _optional(body, "filters", list) or []
        if filters:
            _one_of(body, "filterMatch", MATCHES)  # required when filters are given
        elif body.get("filterMatch") is not None:
            _one_of(body, "filterMatch", MATCHES)
        for rule_filter in filters:
            _one_of(rule_filter, "id", {TAGGED_EVENT_FILTER})
            _required(rule_filter, "key", str)
            if _one_of(rule_filter, "match", TAG_MATCHES) not in VALUELESS_MATCHES:
                _required(rule_filter, "value", str)
        actions = _required(body, "actions", list)
        if not actions:
            raise Invalid("actions: You must add an action for this alert to fire.")
        for action in actions:
            if _one_of(action, "id", {EMAIL_ACTION, SLACK_ACTION}) == EMAIL_ACTION:
                target = _one_of(action, "targetType", {"IssueOwners", "Team", "Member"})
                _one_of(action, "fallthroughType", {"ActiveMembers", "AllMembers", "NoOne"})
                if target == "Member":
                    self._known_user(str(_required(action, "targetIdentifier", int)))
            else:
                self._known_integration(str(_required(action, "workspace", int)))
                _channel(action, "channel")
                _optional(action, "tags", str)

    def _valid_alert_rule(self, body: dict[str, Any]) -> None:
        _only(body, METRIC_ALERT_FIELDS)
        _name(body, "name", MAX_NAME)
        function = re.match(r"^(\w+)\(", _required(body, "aggregate", str))
        if function is None or function.group(1) not in METRIC_FUNCTIONS:
            raise Invalid(f"aggregate: a function of {sorted(METRIC_FUNCTIONS)}")
        if body.get("dataset") is not None:
            _one_of(body, "dataset", METRIC_DATASETS)
        if body.get("queryType") is not None:
            _one_of(body, "queryType", {0, 1, 2})
        for event_type in _optional(body, "eventTypes", list) or []:
            if event_type not in EVENT_TYPES:
                raise Invalid(f"eventTypes: {event_type!r} is not one of {sorted(EVENT_TYPES)}")
        _required(body, "query", str)
        _one_of(body, "timeWindow", TIME_WINDOWS)
        _one_of(body, "thresholdType", {0, 1})
        if body.get("resolveThreshold") is not None:
            _number(body, "resolveThreshold")
        _optional(body, "comparisonDelta", int)
        if _required(body, "projects", list) not in [[slug] for slug in self.project_ids]:
            raise Invalid("projects: a single project, by its slug")
        triggers = _required(body, "triggers", list)
        if "critical" not in [trigger.get("label") for trigger in triggers if isinstance(trigger, dict)]:
            raise Invalid("triggers: a critical trigger is always required")
        for trigger in triggers:
            _only(trigger, TRIGGER_FIELDS, "triggers")
            _one_of(trigger, "label", {"critical", "warning"})
            _number(trigger, "alertThreshold")
            for action in _required(trigger, "actions", list):
                self._valid_metric_action(action)

    def _valid_metric_action(self, action: dict[str, Any]) -> None:
        _only(action, METRIC_ACTION_FIELDS, "actions")
        kind = _one_of(action, "type", METRIC_ACTION_TYPES)
        target = _one_of(action, "targetType", METRIC_TARGET_TYPES)
        if kind in ("pagerduty", "sentry_app"):
            _required(action, "targetIdentifier", int)
        elif kind != "slack" or action.get("inputChannelId") is None:
            _required(action, "targetIdentifier", str)
        if kind not in ("email", "sentry_app"):
            self._known_integration(str(_required(action, "integrationId", int)))
        if kind == "email" and target == "user":
            self._known_user(action["targetIdentifier"])
        if kind == "slack" and action.get("targetIdentifier") is not None:
            _channel(action, "targetIdentifier")

    def _valid_dashboard(self, body: dict[str, Any]) -> None:
        _only(body, DASHBOARD_FIELDS)
        _name(body, "title", MAX_TITLE)
        self._one_project_id(body)
        for widget in _optional(body, "widgets", list) or []:
            _only(widget, WIDGET_FIELDS, "widgets")
            if widget.get("title") is not None:
                _name(widget, "title", MAX_TITLE)
            _one_of(widget, "displayType", DISPLAY_TYPES)
            if widget.get("widgetType") is not None:
                _one_of(widget, "widgetType", WIDGET_TYPES)
            if widget.get("interval") is not None:
                _name(widget, "interval", 10)
            if widget.get("limit") is not None and _required(widget, "limit", int) < 1:
                raise Invalid("limit: at least 1")
            if widget.get("layout") is not None:
                _layout(_required(widget, "layout", dict))
            for query in _optional(widget, "queries", list) or []:
                _only(query, WIDGET_QUERY_FIELDS, "queries")
                for key in ("name", "conditions", "orderby"):
                    _optional(query, key, str)
                for key in ("fields", "aggregates", "columns"):
                    if query.get(key) is not None:
                        _strings(query, key)

    def _valid_query(self, body: dict[str, Any]) -> None:
        _only(body, SAVED_QUERY_FIELDS)
        _name(body, "name", MAX_TITLE)
        self._one_project_id(body)
        if body.get("queryDataset") is not None:
            _one_of(body, "queryDataset", QUERY_DATASETS)
        fields = _strings(body, "fields") if body.get("fields") is not None else []
        if len(fields) > MAX_QUERY_FIELDS:
            raise Invalid(f"fields: at most {MAX_QUERY_FIELDS}")
        orderby = _optional(body, "orderby", str)
        if orderby and orderby.lstrip("-") not in {name for column in fields for name in (column, _alias(column))}:
            raise Invalid(f"orderby: {orderby!r} is not one of the fields")
        for key in ("query", "range", "interval"):
            _optional(body, key, str)
        if body.get("display") is not None:
            _one_of(body, "display", QUERY_DISPLAYS)
        if body.get("topEvents") is not None and not 1 <= _required(body, "topEvents", int) <= 10:
            raise Invalid("topEvents: between 1 and 10")

    def _one_project_id(self, body: dict[str, Any]) -> None:
        if (_optional(body, "projects", list) or [self.project_id]) not in [[pid] for pid in self.project_ids.values()]:
            raise Invalid("projects: the project's numeric id")

    def _known_user(self, user_id: str) -> None:
        if user_id not in {str(member["user"]["id"]) for member in self.members}:
            raise Invalid(f"no member with the user id {user_id}")

    def _known_integration(self, integration_id: str) -> None:
        if integration_id not in {str(item["id"]) for item in self.integrations}:
            raise Invalid(f"no integration {integration_id}")

    def _alert(self, oid: str, rule: dict[str, Any]) -> dict[str, Any]:
        """As the reference shows it: ids as strings, each trigger with its rule's id and threshold type, each
        action with its trigger's id and every target field."""
        dataset = rule.get("dataset") or "events"
        triggers = []
        for index, trigger in enumerate(rule["triggers"]):
            trigger_id = f"{oid}{index}"
            actions = [
                {
                    "id": f"{trigger_id}{n}",
                    "alertRuleTriggerId": trigger_id,
                    "inputChannelId": None,
                    "sentryAppId": None,
                    "dateCreated": CREATED,
                    **action,
                    "integrationId": _string_or_none(action.get("integrationId")),
                }
                for n, action in enumerate(trigger["actions"])
            ]
            triggers.append(
                {
                    "id": trigger_id,
                    "alertRuleId": oid,
                    "thresholdType": rule["thresholdType"],
                    "resolveThreshold": rule.get("resolveThreshold"),
                    "dateCreated": CREATED,
                    **trigger,
                    "actions": actions,
                }
            )
        return {
            "organizationId": "1",
            "environment": None,
            "resolveThreshold": None,
            "owner": None,
            "originalAlertRuleId": None,
            "comparisonDelta": None,
            "eventTypes": [],
            **rule,
            "id": oid,
            "dataset": dataset,
            "queryType": rule.get("queryType", DEFAULT_QUERY_TYPES.get(dataset, 2)),
            "triggers": triggers,
            "dateModified": CREATED,
            "dateCreated": CREATED,
            "createdBy": CREATOR,
        }


def _rule_view(oid: str, rule: dict[str, Any], project: str) -> dict[str, Any]:
    return {
        "environment": None,
        "owner": None,
        "filterMatch": "all",
        "filters": [],
        **rule,
        "id": oid,
        "dateCreated": CREATED,
        "createdBy": CREATOR,
        "projects": [project],
        "status": "active",
        "snooze": False,
    }


def _dashboard(oid: str, board: dict[str, Any]) -> dict[str, Any]:
    widgets = [
        {
            "description": None,
            "thresholds": None,
            "limit": None,
            **widget,
            "id": f"{oid}{index}",
            "dashboardId": oid,
            "dateCreated": CREATED,
            "queries": [
                {
                    "fieldAliases": [],
                    "isHidden": False,
                    **query,
                    "id": f"{oid}{index}{n}",
                    "widgetId": f"{oid}{index}",
                }
                for n, query in enumerate(widget.get("queries", []))
            ],
        }
        for index, widget in enumerate(board.get("widgets", []))
    ]
    return {
        "projects": [],
        "filters": {},
        "environment": [],
        **board,
        "id": oid,
        "widgets": widgets,
        "dateCreated": CREATED,
        "createdBy": CREATOR,
        "permissions": None,
        "isFavorited": False,
        "prebuiltId": None,
    }


def _summary(oid: str, board: dict[str, Any]) -> dict[str, Any]:
    """The list holds summaries: no widgets, only their display types."""
    widgets = board.get("widgets", [])
    return {
        "id": oid,
        "title": board["title"],
        "dateCreated": CREATED,
        "createdBy": CREATOR,
        "environment": board.get("environment") or [],
        "filters": board.get("filters") or {},
        "lastVisited": CREATED,
        "widgetDisplay": [widget["displayType"] for widget in widgets],
        "widgetPreview": [{"displayType": widget["displayType"], "layout": widget.get("layout")} for widget in widgets],
        "permissions": None,
        "isFavorited": False,
        "projects": board.get("projects") or [],
        "prebuiltId": None,
    }


def _query(oid: str, query: dict[str, Any]) -> dict[str, Any]:
    return {
        "projects": [],
        "environment": [],
        "queryDataset": "error-events",
        **query,
        "id": oid,
        "version": 2,
        "datasetSource": "unknown",
        "expired": False,
        "widths": [],
        "dateCreated": CREATED,
        "dateUpdated": CREATED,
        "createdBy": CREATOR,
    }


class _QuietHandler(WSGIRequestHandler):
    """`requests` records every request; a log line for each would bury a failing test's output."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _only(body: Any, allowed: set[str], where: str = "") -> None:
    if not isinstance(body, dict):
        raise Invalid(f"{where or 'body'}: must be an object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise Invalid(f"{where + ': ' if where else ''}{unknown} not in the reference's body parameters")


def _required(body: Any, key: str, kind: type) -> Any:
    if not isinstance(body, dict) or key not in body:
        raise Invalid(f"{key}: this field is required")
    value = body[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Invalid(f"{key}: must be a {kind.__name__}, not {value!r}")
    return value


def _optional(body: dict[str, Any], key: str, kind: type) -> Any:
    return _required(body, key, kind) if body.get(key) is not None else None


def _one_of(body: Any, key: str, allowed: set[Any]) -> Any:
    if not isinstance(body, dict) or key not in body:
        raise Invalid(f"{key}: this field is required")
    if body[key] not in allowed or isinstance(body[key], bool):
        raise Invalid(f"{key}: {body[key]!r} is not one of {sorted(allowed, key=str)}")
    return body[key]


def _name(body: dict[str, Any], key: str, longest: int) -> None:
    if len(_required(body, key, str)) > longest:
        raise Invalid(f"{key}: at most {longest} characters")


def _number(body: dict[str, Any], key: str) -> None:
    value = body.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise Invalid(f"{key}: must be a number, not {value!r}")


def _strings(body: dict[str, Any], key: str) -> list[str]:
    value = _required(body, key, list)
    if not all(isinstance(item, str) for item in value):
        raise Invalid(f"{key}: must be a list of strings")
    return value


def _layout(layout: dict[str, Any]) -> None:
    """The grid's bounds: x 0-5, y >= 0, w 1-6, h >= 1, minH >= 1, and x + w <= 6."""
    _only(layout, {"x", "y", "w", "h", "minH"}, "layout")
    x, y, w, h, min_h = (_required(layout, key, int) for key in ("x", "y", "w", "h", "minH"))
    if not (0 <= x < GRID_COLUMNS and y >= 0 and 1 <= w <= GRID_COLUMNS and h >= 1 and min_h >= 1):
        raise Invalid(f"layout: {layout} is out of the grid's bounds")
    if x + w > GRID_COLUMNS:
        raise Invalid(f"layout: x + w must be at most {GRID_COLUMNS}")


def _alias(column: str) -> str:
    """The name a function's column is ordered by: `count()` is `count`, `p95(transaction.duration)` is
    `p95_transaction_duration`."""
    return re.sub(r"\W+", "_", column).strip("_")


def _string_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _channel(body: dict[str, Any], key: str) -> None:
    if not _required(body, key, str).startswith(("#", "@")):
        raise Invalid(f"{key}: a Slack channel (#name) or user (@name)")
