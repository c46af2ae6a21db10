"""gunicorn's gthread worker, answering what gunicorn refuses before any app sees it (a request line or headers over
its limits, a request it cannot parse) as an RFC 9457 problem, like every other error, not as gunicorn's HTML page."""

from __future__ import annotations

import json
import logging
from typing import Any

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from shared.core.errors import ErrorType
from shared.http.app import PROBLEM_JSON, error_type_of_status, problem_body

log = logging.getLogger(__name__)

NOT_IMPLEMENTED = 501


class _ErrorPage:
    """Takes the place of the client's socket while gunicorn writes its error page, to keep its status line."""

    def __init__(self) -> None:
        self.written = b""

    def gettimeout(self) -> float:
        return 0.0

    def setblocking(self, flag: bool) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.written += data


class ProblemThreadWorker(ThreadWorker):
    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        page = _ErrorPage()
        # gunicorn decides the status and logs the request as ever; only what reaches the client differs.
        super().handle_error(req, page, addr, exc)
        try:
            _, code, reason = page.written.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            status = int(code)
        except ValueError:
            log.warning("gunicorn's error page had no status line: %r", page.written[:80])
            status, reason = 400, "Bad Request"
        if status < 500 or status == NOT_IMPLEMENTED:  # the request's fault (501: a transfer coding gunicorn lacks)
            error_type = ErrorType.VALIDATION_ERROR if status >= 500 else error_type_of_status(status)
            detail = f"{reason}: the request was refused as it was read (its request line, headers or framing)."
        else:
            error_type, detail = ErrorType.INTERNAL_ERROR, f"{reason}: the request failed before it reached Callflow."
        body = problem_body(error_type, detail, status, request_id=None)
        content = json.dumps(body).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: {PROBLEM_JSON}\r\n"
            f"Content-Length: {len(content)}\r\n\r\n"
        )
        # gunicorn then closes the connection gracefully: it reads what the client still sends for a moment, so the
        # answer is not lost under a reset.
        try:
            util.write_nonblock(client, head.encode("latin-1") + content)
        except Exception:  # as gunicorn: a client that has gone cannot be told
            log.debug("failed to send the error answer", exc_info=True)
