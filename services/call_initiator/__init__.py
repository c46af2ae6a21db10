"""call-initiator: the public REST API."""
