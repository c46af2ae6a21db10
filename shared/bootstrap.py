"""What every service's composition root builds: logging, Sentry, the broker topology, and the objects the call
lifecycle is handed (engine, units of work, publisher, Bolna client).

Each service's own `bootstrap()` calls `start_service` once per process (after any fork) and wires the result
into its app or its workers; nothing here runs on import.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.bolna.client import BolnaClient
from shared.calls.initiation import CallPlacer
from shared.calls.store import SlotLeases
from shared.core import db
from shared.core.config import Settings
from shared.core.uow import UnitOfWork
from shared.http.health import HealthCheck
from shared.messaging.outbox import AfterCommitPublisher
from shared.messaging.publisher import Publisher
from shared.messaging.topology import BROKER_AWAY, declare_topology_at
from shared.observability.sentry import init_sentry, report_broker_failure

log = logging.getLogger(__name__)


@dataclass
class Components:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    publisher: Publisher
    bolna: BolnaClient

    def uow(self) -> UnitOfWork:
        return UnitOfWork(self.sessions, self.after_commit, self.leases)

    @functools.cached_property
    def after_commit(self) -> AfterCommitPublisher:
        return AfterCommitPublisher(self.sessions, self.publisher)

    @functools.cached_property
    def leases(self) -> SlotLeases:
        return SlotLeases(self.settings.initiating_lease_seconds, self.settings.slot_lease_seconds)

    @functools.cached_property
    def placer(self) -> CallPlacer:
        return CallPlacer(self.uow, self.bolna, self.settings.dispatch_max_attempts)

    def health(self, service: str) -> HealthCheck:
        return HealthCheck(service, self.settings, self.engine)


def build_components(settings: Settings) -> Components:
    """The process's engine, publisher and Bolna client; connections open on first use."""
    engine = db.create_db_engine(settings)
    return Components(
        settings=settings,
        engine=engine,
        sessions=db.session_maker(engine),
        publisher=Publisher(settings.rabbitmq_url),
        bolna=BolnaClient.from_settings(settings),
    )


def start_service(service: str, settings: Settings, http_transactions: bool = True) -> Components:
    """`http_transactions`: see `init_sentry`."""
    configure_logging(settings)
    init_sentry(service, settings, http_transactions)
    try:
        declare_topology_at(settings.rabbitmq_url)
    except BROKER_AWAY as exc:  # a broker that is down must not stop the service from answering
        log.warning("could not declare the broker topology at start (declared again on first publish): %r", exc)
        report_broker_failure(exc, place="broker.declare")
    return build_components(settings)


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("pika").setLevel(logging.WARNING)  # pika narrates every connection at INFO
