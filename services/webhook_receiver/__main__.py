from services.webhook_receiver.app import create_app
from shared.server import serve

serve(create_app, default_port=8002)
