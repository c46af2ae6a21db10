"""`/api/campaigns`: create a campaign from JSON or CSV, start, pause, resume or cancel it, and read its progress,
its calls and its results."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import timedelta
from typing import Any

from flask import Blueprint, Response, jsonify, request, stream_with_context
from pydantic import ValidationError

from services.call_initiator import idempotency
from services.call_initiator.auth import authenticate
from services.call_initiator.views import call_view
from shared.bootstrap import Components
from shared.calls import statuses
from shared.campaigns import commands, spec, states, views
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import User
from shared.http.bodies import json_body, validation_error

# Ten thousand contacts with a few variables each are about a megabyte of JSON.
MAX_CAMPAIGN_BODY_BYTES = 16 * 1024 * 1024
CSV_TYPES = ("text/csv", "application/csv")
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?\d+(\.\d+)?")


def add_campaign_routes(api: Blueprint, components: Components) -> None:
    uow = components.uow
    key_retention = timedelta(hours=components.settings.idempotency_key_retention_hours)

    def customer() -> User:
        return authenticate(uow, request.headers.get("Authorization"))

    @api.post("/campaigns")
    def create_campaign():
        user = customer()
        request.max_content_length = MAX_CAMPAIGN_BODY_BYTES
        raw, settings, contacts = _read_campaign()
        begun = idempotency.begin(uow, user.id, raw, key_retention)
        if begun.replay is not None:
            return begun.replay
        with uow() as unit:
            created = commands.create_campaign(unit, user.id, settings, contacts)
            if begun.claim is not None:
                idempotency.claim_key(unit.session, begun.claim, campaign_id=created.campaign.id)
            unit.commit()
        return jsonify(commands.created_answer(created)), 201

    @api.post("/campaigns/<campaign_id>/<action>")
    def change_campaign(campaign_id: str, action: str):
        user = customer()
        try:
            move = states.Action(action)
        except ValueError as exc:
            raise CallflowError(
                ErrorType.NOT_FOUND, f"No action {action!r}; use start, pause, resume or cancel."
            ) from exc
        campaign = commands.change_status(uow, user.id, campaign_id, move)
        return jsonify(views.summary_view(campaign))

    @api.get("/campaigns/<campaign_id>")
    def read_campaign(campaign_id: str):
        user = customer()
        with uow() as unit:
            # One snapshot: the status and every count agree with each other, even while the campaign runs.
            unit.session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            campaign = commands.owned_campaign(unit, user.id, campaign_id)
            return jsonify(views.campaign_view(unit.session, campaign))

    @api.get("/campaigns")
    def list_campaigns():
        user = customer()
        limit = _limit()
        with uow() as unit:
            campaigns = unit.reads_only().session.scalars(views.campaigns_of_query(user.id, limit)).all()
        return jsonify({"campaigns": [views.summary_view(campaign) for campaign in campaigns]})

    @api.get("/campaigns/<campaign_id>/calls")
    def campaign_calls(campaign_id: str):
        user = customer()
        campaign = commands.find_campaign(uow, user.id, campaign_id)
        with uow() as unit:
            page, cursor = views.calls_page(
                unit.reads_only().session,
                campaign.id,
                _call_status(),
                request.args.get("cursor"),
                _limit(),
            )
            return jsonify({"calls": [call_view(call) for call in page], "nextCursor": cursor})

    @api.get("/campaigns/<campaign_id>/results.csv")
    def campaign_results(campaign_id: str):
        user = customer()
        campaign = commands.find_campaign(uow, user.id, campaign_id)

        def rows():
            yield _csv_line(views.RESULT_COLUMNS)
            with uow() as unit:
                for row in views.result_rows(unit.session, campaign.id):
                    yield _csv_line(row)

        headers = {"Content-Disposition": f'attachment; filename="campaign-{campaign.id}-results.csv"'}
        return Response(stream_with_context(rows()), mimetype="text/csv", headers=headers)


def _csv_text() -> str:
    """The CSV body, read in the charset its Content-Type names (UTF-8 by default): a spreadsheet's export in another
    one is read as written, never with its letters replaced. U+0000, which PostgreSQL cannot store, is dropped, as
    from a JSON body."""
    charset = request.mimetype_params.get("charset", "utf-8")
    try:
        text = request.get_data().decode(charset)
    except UnicodeDecodeError as exc:
        raise CallflowError(
            ErrorType.VALIDATION_ERROR,
            f"The CSV cannot be read as {charset[:40]!r}: byte {exc.start} is not valid in it.",
        ) from exc
    except (LookupError, ValueError) as exc:  # no such charset, none text is read in, or a name holding U+0000
        raise CallflowError(ErrorType.VALIDATION_ERROR, f"The CSV's charset {charset[:40]!r} is unknown.") from exc
    try:
        text.encode("utf-8")  # a codec such as unicode_escape can make lone surrogates, which no database stores
    except UnicodeEncodeError as exc:
        raise CallflowError(ErrorType.VALIDATION_ERROR, "The CSV holds text that is not valid Unicode.") from exc
    return text.replace("\x00", "")


def _read_campaign() -> tuple[Any, spec.CampaignSettings, spec.ContactList]:
    """The settings and contacts from a JSON body, or from a CSV body and the query string."""
    if request.mimetype in CSV_TYPES:
        text = _csv_text()
        query = request.args.to_dict()
        try:
            settings_raw = spec.settings_from_query(query)
            contacts = spec.contacts_from_csv(text)
        except (ValueError, csv.Error) as exc:  # csv.Error: a field longer than the csv module takes
            raise CallflowError(ErrorType.VALIDATION_ERROR, f"Invalid campaign upload: {exc}") from exc
        raw: Any = {"query": query, "csv": text}
    else:
        raw = json_body()
        if not isinstance(raw, dict):
            raise CallflowError(ErrorType.VALIDATION_ERROR, "The body must be a JSON object (or a text/csv upload).")
        settings_raw = {key: value for key, value in raw.items() if key != "contacts"}
        listed = raw.get("contacts")
        if not isinstance(listed, list):
            raise CallflowError(ErrorType.VALIDATION_ERROR, "contacts: must be a list of contacts.")
        try:
            contacts = spec.contacts_from_json(listed)
        except ValueError as exc:
            raise CallflowError(ErrorType.VALIDATION_ERROR, f"contacts: {exc}") from exc
    try:
        if request.mimetype in CSV_TYPES:  # query parameters are text: numbers are read from it
            settings = spec.CampaignSettings.model_validate(settings_raw)
        else:  # JSON's types as sent, as POST /api/calls takes them: `true` is no number, "3" no integer
            settings = spec.CampaignSettings.model_validate_json(json.dumps(settings_raw), strict=True)
    except ValidationError as exc:
        raise validation_error(exc) from exc
    return raw, settings, contacts


def _call_status() -> str | None:
    status = request.args.get("status") or None
    if status is not None and status not in statuses.RANKED:
        raise CallflowError(ErrorType.VALIDATION_ERROR, f"status must be one of {', '.join(sorted(statuses.RANKED))}.")
    return status


def _limit() -> int:
    try:
        limit = int(request.args.get("limit", views.MAX_PAGE))
    except ValueError:
        limit = 0
    if not 1 <= limit <= views.MAX_PAGE:
        raise CallflowError(ErrorType.VALIDATION_ERROR, f"limit must be 1 to {views.MAX_PAGE}.")
    return limit


def _csv_line(values: Any) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow([_safe_cell(value) for value in values])
    return buffer.getvalue()


def _safe_cell(value: Any) -> str:
    """A leading formula character is neutralised (a name such as `=HYPERLINK(...)` from an upload), so a spreadsheet
    shows the text and never runs it; numbers such as +14155550123 stay as they are."""
    text = "" if value is None else str(value)
    if text[:1] in _FORMULA_STARTS and not _NUMBER.fullmatch(text):
        return "'" + text
    return text
