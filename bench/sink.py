"""A Sentry endpoint that takes envelopes and keeps nothing: it stands for a Sentry elsewhere on the network, so
the services pay what sending costs them and the machine does not also pay for reading every envelope."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class DiscardingSink:
    def __init__(self) -> None:
        self.envelopes = 0
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with sink._lock:
                    sink.envelopes += 1
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def dsn(self) -> str:
        return f"http://public@127.0.0.1:{self._server.server_port}/1"

    def start(self) -> DiscardingSink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
