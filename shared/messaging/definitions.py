"""The broker's topology as a RabbitMQ definitions document, for a broker to load at boot
(deploy/rabbitmq/definitions.json is this module's output, and a test keeps the two equal).

It holds the vhost, what the services declare in it and the policies they cannot declare, and no users: RabbitMQ
definitions carry password hashes, which have no place in the repository. A broker that loads definitions at boot
seeds no default user either, so its users come from `default_users.*` in its configuration (see deploy/rabbitmq/)."""

from __future__ import annotations

import json
from typing import Any

from shared.messaging.topology import TOPOLOGY, Topology

# The vhost the containerised stack runs in; `callctl mq definitions --vhost` writes a document for another.
DEFAULT_VHOST = "callflow"


def definitions(vhost: str = DEFAULT_VHOST, topology: Topology = TOPOLOGY) -> dict[str, Any]:
    return {
        "vhosts": [{"name": vhost}],
        "exchanges": [
            {
                "name": exchange.name,
                "vhost": vhost,
                "type": exchange.type,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for exchange in topology.exchanges
        ],
        "queues": [
            {"name": queue.name, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": queue.arguments}
            for queue in topology.queues
        ],
        "bindings": [
            {
                "source": binding.exchange,
                "vhost": vhost,
                "destination": binding.queue,
                "destination_type": "queue",
                "routing_key": binding.routing_key,
                "arguments": {},
            }
            for binding in topology.bindings
        ],
        "policies": [
            {
                "name": policy.name,
                "vhost": vhost,
                "pattern": policy.pattern,
                "apply-to": "queues",
                "definition": policy.definition,
                "priority": 0,
            }
            for policy in topology.policies
        ],
    }


def render(document: dict[str, Any]) -> str:
    """Stable text (key order kept, one trailing newline), so the committed file diffs cleanly."""
    return json.dumps(document, indent=2) + "\n"
