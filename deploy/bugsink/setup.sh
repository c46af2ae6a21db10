#!/usr/bin/env bash
# Sets up Bugsink, a local Sentry-compatible error tracker, in a state dir: its own venv, its config, an SQLite
# database, the admin user, the callflow team and project, and an API token. Leaves the project's DSN in STATE/dsn and
# the token in STATE/api-token. Run it again at will: when everything exists it changes nothing.
#
# Usage: deploy/bugsink/setup.sh [STATE]  (default: .bugsink in the repo root)
# Env:   BUGSINK_PORT            the port run.sh serves on, which the DSN names (default 8000)
#        BUGSINK_ADMIN_PASSWORD  the admin's password when the admin is created (default admin)
set -euo pipefail

readonly BUGSINK_VERSION=2.6.2

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
state=${1:-$repo/.bugsink}
# The state dir holds the secret key, the admin's data and the API token: for this user's eyes only.
umask 077
mkdir -p "$state"
state=$(cd "$state" && pwd)
venv=$state/venv

installed_version() {
    "$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("bugsink"))' 2>/dev/null || true
}

write_if_changed() {
    local tmp
    tmp=$(mktemp "$1.XXXXXX")
    cat >"$tmp"
    if cmp -s "$tmp" "$1"; then rm "$tmp"; else mv "$tmp" "$1"; fi
}

manage() {
    (cd "$state" && DJANGO_SETTINGS_MODULE=bugsink_conf "$venv/bin/bugsink-manage" "$@")
}

if [[ $(installed_version) != "$BUGSINK_VERSION" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "bugsink==$BUGSINK_VERSION"
fi

if [[ ! -s $state/secret-key ]]; then
    python3 -c 'import secrets; print(secrets.token_urlsafe(50))' >"$state/secret-key"
fi

# Paths come from the config file's own location, so the file names no machine's paths; the port is read when Bugsink
# starts, so that this script (which writes the DSN) and run.sh agree through BUGSINK_PORT.
write_if_changed "$state/bugsink_conf.py" <<'PY'
import os
from pathlib import Path

from bugsink.settings.default import *  # noqa: F403
from bugsink.settings.default import DATABASES

STATE = Path(__file__).resolve().parent

SECRET_KEY = (STATE / "secret-key").read_text().strip()
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
TIME_ZONE = "UTC"
DATABASES["default"]["NAME"] = STATE / "db.sqlite3"
DATABASES["snappea"]["NAME"] = STATE / "snappea.sqlite3"

# Events are digested inside the request that brings them: no snappea worker process to run.
SNAPPEA = {"TASK_ALWAYS_EAGER": True}
EMAIL_BACKEND = "bugsink.email_backends.QuietConsoleEmailBackend"

BUGSINK = {
    "BASE_URL": f"http://127.0.0.1:{os.environ.get('BUGSINK_PORT', '8000')}",
    "SINGLE_USER": True,
    "SINGLE_TEAM": True,
    "PHONEHOME": False,
    "INGEST_STORE_BASE_DIR": str(STATE / "ingestion"),
}
PY

manage migrate --noinput -v 0
manage migrate snappea --database=snappea --noinput -v 0

STATE=$state ADMIN_PASSWORD=${BUGSINK_ADMIN_PASSWORD:-admin} \
    manage shell --no-imports -v 0 -c "$(cat "$repo/deploy/bugsink/bootstrap.py")"

echo "Bugsink $BUGSINK_VERSION ready in $state: DSN $(cat "$state/dsn")"
