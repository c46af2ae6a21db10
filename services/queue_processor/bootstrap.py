"""The queue-processor's composition root: its consumer, handlers and jobs are built and wired here."""

from __future__ import annotations

import threading

from services.queue_processor.app import SERVICE, QueueProcessor
from services.queue_processor.campaigns import CampaignDispatch
from services.queue_processor.consumer import Consumer
from services.queue_processor.dispatch import Dispatcher
from services.queue_processor.handlers import DispatchQueueHandler
from services.queue_processor.jobs import PeriodicJobs
from services.queue_processor.reconcile import ProviderReconciler, ReconcileBounds
from shared.bootstrap import start_service
from shared.core.config import Settings
from shared.http.app import create_http_app
from shared.messaging.topology import DISPATCH_QUEUE


def bootstrap(settings: Settings) -> QueueProcessor:
    components = start_service(SERVICE, settings)
    dispatcher = Dispatcher(components.placer, settings.dispatch_concurrency, CampaignDispatch())
    reconciler = ProviderReconciler(components.uow, components.bolna, ReconcileBounds.from_settings(settings))
    stopping = threading.Event()
    return QueueProcessor(
        settings=settings,
        health_app=create_http_app(SERVICE, components.health(SERVICE)),
        consumer=Consumer(
            settings.rabbitmq_url,
            DISPATCH_QUEUE,
            DispatchQueueHandler(dispatcher, components.bolna),
            settings.rabbitmq_prefetch,
            stopping,
        ),
        jobs=PeriodicJobs(components, dispatcher, reconciler),
        dispatcher=dispatcher,
        after_commit=components.after_commit,
        stopping=stopping,
    )
