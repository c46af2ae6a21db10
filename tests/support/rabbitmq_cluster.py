"""A 3-node RabbitMQ cluster on this machine, for a test to stop and restart its nodes.

The nodes are run from the installed RabbitMQ's own scripts, each with its own ports, data and logs in a temporary
directory, and a cookie of their own: the machine's node (`rabbit@localhost`, port 5672) and its cookie are never
touched. Debian's wrappers in /usr/sbin would switch to the `rabbitmq` user and that node's cookie, so the scripts
they wrap are run directly.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import free_port

RABBITMQ_SCRIPTS = Path("/usr/lib/rabbitmq/bin")
NODES = 3
START_TIMEOUT_SECONDS = 120
CLI_TIMEOUT_SECONDS = 120


def available() -> bool:
    return (RABBITMQ_SCRIPTS / "rabbitmq-server").exists() and (RABBITMQ_SCRIPTS / "rabbitmqctl").exists()


@dataclass
class Node:
    name: str  # Erlang node name, e.g. callflow-1a2b3c-1@localhost
    amqp_port: int
    dist_port: int
    home: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/%2F"


class RabbitMQCluster:
    def __init__(self, root: Path):
        self.root = root
        self._cookie_home = root / "home"  # HOME of the nodes and of rabbitmqctl: its .erlang.cookie is theirs
        prefix = f"callflow-{uuid.uuid4().hex[:6]}"
        self.nodes = [
            Node(f"{prefix}-{i}@localhost", free_port(), free_port(), root / f"node{i}") for i in range(1, NODES + 1)
        ]

    @property
    def url(self) -> str:
        """RABBITMQ_URL naming every node."""
        return ",".join(node.url for node in self.nodes)

    def start(self) -> None:
        """Starts every node and joins the others to the first."""
        self._cookie_home.mkdir(parents=True)
        cookie = self._cookie_home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)
        for node in self.nodes:
            self._write_config(node)
            self.start_node(node)
        for node in self.nodes:
            self.await_startup(node)
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", seed.name)
            self.ctl(node, "start_app")
        running = self.ctl(seed, "eval", "length(rabbit_nodes:all_running()).").strip()
        if running != str(NODES):
            raise RuntimeError(f"the cluster has {running} running nodes, not {NODES}")

    def start_node(self, node: Node) -> None:
        """Starts a node's VM (again, after `kill`: it rejoins the cluster from its data); `await_startup` waits."""
        log = (node.home / "console.log").open("ab")
        with log:  # the child keeps its own copy of the descriptor
            node.process = subprocess.Popen(
                [str(RABBITMQ_SCRIPTS / "rabbitmq-server")],
                env=self._env(node),
                cwd=node.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the script and the VM it starts are killed together
            )

    def await_startup(self, node: Node) -> None:
        """Waits until the node runs RabbitMQ; `await_startup` fails at once while the VM has not yet registered."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if node.process is None or node.process.poll() is not None:
                raise RuntimeError(f"{node.name} exited:\n{self.console(node)}")
            try:
                self.ctl(node, "await_startup", "--timeout", str(START_TIMEOUT_SECONDS))
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(1)

    def console(self, node: Node) -> str:
        path = node.home / "console.log"
        return path.read_text(errors="replace")[-8000:] if path.exists() else ""

    def kill(self, node: Node) -> None:
        """Kills the node's VM at once, as a crash or a lost machine would: no connection is closed cleanly."""
        if node.process is not None and node.process.poll() is None:
            os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait(30)

    def stop(self) -> None:
        """Stops every node still running (SIGTERM to its script stops its VM cleanly), killing one that hangs."""
        for node in self.running_nodes():
            os.killpg(node.process.pid, signal.SIGTERM)
        for node in self.nodes:
            try:
                if node.process is not None:
                    node.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill(node)

    def consumer_nodes(self, queue: str) -> list[str]:
        """The node each consumer of `queue` (in vhost /) is connected to, one entry per consumer."""
        listed = self.ctl(
            self.running_nodes()[0], "list_consumers", "-p", "/", "--no-table-headers", "queue_name", "channel_pid"
        )
        return [
            _node_of_pid(channel)
            for name, channel in (line.split("\t") for line in listed.splitlines())
            if name == queue
        ]

    def running_nodes(self) -> list[Node]:
        return [node for node in self.nodes if node.process is not None and node.process.poll() is None]

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def ctl(self, node: Node, *args: str) -> str:
        result = subprocess.run(
            [str(RABBITMQ_SCRIPTS / "rabbitmqctl"), "-q", "-n", node.name, *args],
            env=self._env(node),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_SECONDS,
        )
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {node.name} {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def _write_config(self, node: Node) -> None:
        node.home.mkdir(parents=True)
        (node.home / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}\n")
        (node.home / "enabled_plugins").write_text("[].\n")
        (node.home / "rabbitmq-env.conf").write_text("")  # not the machine's, which names the machine's node

    def _env(self, node: Node) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self._cookie_home),
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(node.amqp_port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CONF_ENV_FILE": str(node.home / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(node.home / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(node.home / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.home / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(node.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.home / "log"),
            "RABBITMQ_PID_FILE": str(node.home / "rabbitmq.pid"),
        }


def _node_of_pid(pid: str) -> str:
    """The node an Erlang process lives on, from the way rabbitmqctl prints its pid: <name@host.1796006342.1234.0>
    (the nodes have short names: their host has no dot)."""
    name, _, rest = pid.strip().strip("<>").partition("@")
    return f"{name}@{rest.split('.')[0]}"


@contextmanager
def rabbitmq_cluster() -> Iterator[RabbitMQCluster]:
    """A started 3-node cluster; its nodes are stopped and its files removed afterwards, whatever happened."""
    root = Path(tempfile.mkdtemp(prefix="callflow-rabbitmq-cluster-"))
    cluster = RabbitMQCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
