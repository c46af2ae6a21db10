#!/usr/bin/env bash
# Serves the Bugsink that setup.sh made, in the foreground on 127.0.0.1. SIGTERM stops it gracefully, SIGINT at once.
#
# Usage: deploy/bugsink/run.sh [STATE]  (default: .bugsink in the repo root)
# Env:   BUGSINK_PORT  the port to serve on (default 8000); give setup.sh the same one, as the DSN names it
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
state=${1:-$repo/.bugsink}
if [[ ! -f $state/bugsink_conf.py ]]; then
    echo "no Bugsink in $state: run deploy/bugsink/setup.sh first" >&2
    exit 1
fi
cd "$state"

export BUGSINK_PORT=${BUGSINK_PORT:-8000}
export DJANGO_SETTINGS_MODULE=bugsink_conf
# Without a control socket, gunicorn writes nothing to ~/.gunicorn, and instances on other ports don't collide there.
exec venv/bin/gunicorn bugsink.wsgi \
    --bind "127.0.0.1:$BUGSINK_PORT" \
    --workers 2 \
    --timeout 30 \
    --no-control-socket
