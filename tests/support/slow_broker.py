"""Brokers that keep a client waiting, for a test: one that accepts connections and never answers, and a proxy to
the real broker that can stop passing on its answers, or tell its clients they are blocked (as RabbitMQ does under
a memory or disk alarm), while the machine's broker and every other test run using it carry on."""

from __future__ import annotations

import socket
import threading
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit

import pika
from pika.frame import Method


class BlackHoleBroker:
    """Accepts TCP connections and reads whatever comes, never answering: no AMQP handshake ever starts."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self._accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, name=f"black-hole-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            self._accepted.append(client)
            threading.Thread(target=_drain, args=(client,), daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        for client in self._accepted:
            client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None):
        self.close()


class HoldingBrokerProxy:
    """A proxy to a broker whose answers can be held back (the broker looks alive, but slow to
    answer or confirm), and whose clients can be told they are blocked. Meant for connections that are idle when
    either happens: nothing is ever cut in the middle of a frame."""

    def __init__(self, broker_url: str):
        """`broker_url`: the broker and vhost to reach; `url` reaches the same through the proxy."""
        broker = urlsplit(broker_url)
        self._target = (broker.hostname or "127.0.0.1", broker.port or 5672)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        credentials, _, _ = broker.netloc.rpartition("@")
        self.url = urlunsplit(broker._replace(netloc=f"{credentials}@127.0.0.1:{self.port}".lstrip("@")))
        self._answering = threading.Event()
        self._answering.set()
        self._lock = threading.Lock()
        self._clients: list[socket.socket] = []
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name=f"holding-proxy-{self.port}", daemon=True).start()

    def hold_answers(self) -> None:
        """From now on nothing the broker sends reaches the clients (it is kept, and passed on by `answer`)."""
        with self._lock:
            self._answering.clear()

    def answer(self) -> None:
        self._answering.set()

    def block_clients(self) -> None:
        """Sends every client connection.blocked and holds the broker's answers: a broker under an alarm stops
        reading from blocked connections, so nothing they publish is confirmed."""
        blocked = Method(0, pika.spec.Connection.Blocked(reason="low on memory")).marshal()
        with self._lock:
            self._answering.clear()
            for client in self._clients:
                client.sendall(blocked)

    def close(self) -> None:
        self._listener.close()
        self._answering.set()
        with self._lock:
            for sock in self._sockets:
                _close(sock)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None):
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._clients.append(client)
                self._sockets += [client, upstream]
            threading.Thread(target=self._pass_on, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pass_on, args=(upstream, client, self._answering), daemon=True).start()

    def _pass_on(self, source: socket.socket, destination: socket.socket, gate: threading.Event | None) -> None:
        try:
            while data := source.recv(65536):
                if gate is not None:
                    gate.wait()
                with self._lock:  # never interleaved with a frame `block_clients` sends
                    destination.sendall(data)
        except OSError:
            pass  # closed by either side, or by the proxy
        finally:
            with self._lock:
                for sock in (source, destination):
                    if sock in self._clients:
                        self._clients.remove(sock)
                    if sock in self._sockets:
                        self._sockets.remove(sock)
            _close(source)
            _close(destination)


def _drain(client: socket.socket) -> None:
    try:
        while client.recv(65536):
            pass
    except OSError:
        pass  # closed


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
