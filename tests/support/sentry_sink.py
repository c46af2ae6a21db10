"""A stand-in for Sentry's ingest endpoint: it receives the real envelopes the services' SDKs send over HTTP."""

from __future__ import annotations

import gzip
import json
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Item:
    type: str
    payload: Any  # parsed JSON where the item is JSON, else raw bytes

    @property
    def tags(self) -> dict[str, str]:
        tags = self.payload.get("tags") or {}
        return dict(tags) if isinstance(tags, dict) else {key: value for key, value in tags}

    @property
    def trace_id(self) -> str | None:
        return ((self.payload.get("contexts") or {}).get("trace") or {}).get("trace_id")

    @property
    def op(self) -> str | None:
        """A transaction's operation (`queue.process`, `queue.initiate_call`, ...)."""
        return ((self.payload.get("contexts") or {}).get("trace") or {}).get("op")

    @property
    def span_data(self) -> dict[str, Any]:
        """The data a transaction's own span carries (`span.set_data`)."""
        return ((self.payload.get("contexts") or {}).get("trace") or {}).get("data") or {}

    @property
    def started_at(self) -> float:
        """When a transaction started, in seconds since the epoch, comparable with `time.time()`."""
        return datetime.fromisoformat(self.payload["start_timestamp"]).timestamp()


def parse_envelope(body: bytes) -> list[Item]:
    lines = body.split(b"\n", 1)
    rest = lines[1] if len(lines) > 1 else b""
    items: list[Item] = []
    while rest.strip():
        header_line, _, rest = rest.partition(b"\n")
        if not header_line.strip():
            continue
        header = json.loads(header_line)
        if "length" in header:
            payload, rest = rest[: header["length"]], rest[header["length"] :]
            rest = rest[1:] if rest.startswith(b"\n") else rest
        else:
            payload, _, rest = rest.partition(b"\n")
        try:
            parsed: Any = json.loads(payload)
        except ValueError:
            parsed = payload
        items.append(Item(header.get("type", ""), parsed))
    return items


class SentrySink:
    """Sentry's ingest endpoint, on a free local port. With `keep=False` it only counts what it is sent: it stands
    for a Sentry elsewhere on the network, so a benchmark's machine does not also pay for reading every envelope."""

    def __init__(self, keep: bool = True) -> None:
        self.raw: list[bytes] = []
        self.items: list[Item] = []
        self.envelopes = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            # Sentry keeps an SDK's connection open between envelopes; a sink that closed it after each one would
            # charge every envelope a new connection, a cost the services do not pay against Sentry.
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # the body is written after the headers: not held back for their ACK

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with sink._lock:
                    sink.envelopes += 1
                if keep:
                    sink.keep(body, self.headers.get("Content-Encoding") or "")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                self.close_connection = sink._stopped.is_set()  # a stopped sink takes no more over an open connection

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def keep(self, body: bytes, encoding: str) -> None:
        encoding = encoding.lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        with self._lock:
            self.raw.append(body)
            self.items.extend(parse_envelope(body))

    @property
    def dsn(self) -> str:
        return f"http://public@127.0.0.1:{self._server.server_port}/1"

    def start(self) -> SentrySink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()

    def of_type(self, item_type: str, where: Callable[[Item], bool] = lambda item: True) -> list[Item]:
        with self._lock:
            return [item for item in self.items if item.type == item_type and where(item)]

    def events(self, **tags: str) -> list[Item]:
        return self.of_type("event", lambda item: all(item.tags.get(k) == v for k, v in tags.items()))

    def transactions(self, where: Callable[[Item], bool] = lambda item: True) -> list[Item]:
        return self.of_type("transaction", where)

    def transactions_of(self, op: str) -> list[Item]:
        return self.transactions(lambda item: item.op == op)

    def wait_for_events(self, expected: int = 1, timeout: float = 30.0, settle: float = 1.5, **tags: str) -> list[Item]:
        """Waits until `expected` events with these tags arrived, then a little longer to catch any extra one."""
        deadline = time.monotonic() + timeout
        while len(self.events(**tags)) < expected and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(settle)
        return self.events(**tags)

    def everything(self) -> bytes:
        with self._lock:
            return b"\n".join(self.raw)
