"""`python -m services.webhook_receiver`: Bolna's webhooks under gunicorn on $HOST:$PORT (default 8002)."""

from services.webhook_receiver.bootstrap import bootstrap, source_checks
from shared.core.config import load_settings
from shared.http.server import serve

settings = load_settings()
source_checks(settings)  # a missing or malformed secret stops the start here, before any worker forks
serve(lambda: bootstrap(settings), settings, default_port=8002)
