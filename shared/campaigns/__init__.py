"""Campaigns: a list of contacts one agent calls, dispatched by the queue-processor within the customer's limits."""
