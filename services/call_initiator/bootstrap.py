"""The call-initiator's composition root: everything the API needs is built here, once per worker process."""

from __future__ import annotations

from flask import Flask

from services.call_initiator.app import SERVICE, create_app
from shared.bootstrap import start_service
from shared.core.config import Settings


def bootstrap(settings: Settings) -> Flask:
    return create_app(start_service(SERVICE, settings))
