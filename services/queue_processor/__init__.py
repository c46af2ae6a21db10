"""queue-processor: consumes RabbitMQ, dispatches queued calls, runs the periodic jobs."""
