from services.call_initiator.app import create_app
from shared.server import serve

serve(create_app, default_port=8001)
