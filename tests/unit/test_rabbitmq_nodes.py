"""RABBITMQ_URL naming several nodes of a cluster: each becomes connection parameters, in an order that spreads
replicas over the nodes; a malformed entry stops the process at start, naming the entry but not its password."""

import pytest

from shared.core.config import Settings
from shared.messaging.topology import HEARTBEAT_SECONDS, connection_parameters
from tests.unit.test_config import _start_with

NODES = "amqp://u:p@h1:5672/vh, amqp://u:p@h2:5673/vh,amqps://u:p@h3:5671/vh"


def test_each_node_gets_its_parameters():
    nodes = connection_parameters(NODES)
    assert sorted((node.host, node.port) for node in nodes) == [("h1", 5672), ("h2", 5673), ("h3", 5671)]
    assert {(node.virtual_host, node.heartbeat, node.connection_attempts) for node in nodes} == {
        ("vh", HEARTBEAT_SECONDS, 1)
    }


def test_connections_start_at_every_node_in_turn():
    firsts = {connection_parameters(NODES)[0].host for _ in range(200)}
    assert firsts == {"h1", "h2", "h3"}


def test_several_nodes_are_a_valid_setting():
    assert Settings(rabbitmq_url=NODES).rabbitmq_url == NODES


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("amqp://u:secret@a:5672/vh,http://u:secret@b:5672/vh", "node 2 of 2 is not an amqp:// or amqps:// URL"),
        ("amqp://u:secret@a:5672/vh,,amqp://u:secret@b:5672/vh", "node 2 of 3 is not an amqp:// or amqps:// URL"),
        ("amqp://u:secret@a:5672/vh,amqp://u:secret@b:port/vh", "node 2 of 2 is malformed"),
    ],
)
def test_a_malformed_node_fails_at_start_naming_it(url, named):
    result = _start_with({"RABBITMQ_URL": url, "PATH": "/usr/bin"})
    assert result.returncode == 2
    assert f"RABBITMQ_URL: {named}" in result.stderr
    assert "secret" not in result.stderr
