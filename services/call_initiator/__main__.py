"""`python -m services.call_initiator`: the public API under gunicorn on $HOST:$PORT (default 8001)."""

from services.call_initiator.bootstrap import bootstrap
from shared.core.config import load_settings
from shared.http.server import serve

settings = load_settings()
serve(lambda: bootstrap(settings), settings, default_port=8001)
