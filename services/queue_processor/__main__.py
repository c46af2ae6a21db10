"""`python -m services.queue_processor`: the dispatch consumer, the periodic jobs, and health on $PORT (8003)."""

from services.queue_processor.bootstrap import bootstrap
from shared.core.config import load_settings
from shared.core.heap import freeze_startup_heap

processor = bootstrap(load_settings())
freeze_startup_heap()
processor.run()
