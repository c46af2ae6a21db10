from services.queue_processor.app import run

run()
