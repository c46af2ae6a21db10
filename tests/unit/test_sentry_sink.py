"""The Sentry stand-in answers as Sentry does, so what the services pay to report is what they pay in production."""

import http.client
from urllib.parse import urlsplit

from tests.support.sentry_sink import SentrySink


def test_the_sink_keeps_an_sdks_connection_open_between_envelopes():
    sink = SentrySink(keep=False).start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", urlsplit(sink.dsn).port, timeout=5)
        sockets = []
        for _ in range(2):
            connection.request("POST", "/api/1/envelope/", body=b"{}\n")
            answer = connection.getresponse()
            assert (answer.status, answer.read()) == (200, b"{}")
            sockets.append(connection.sock)
        connection.close()
    finally:
        sink.stop()
    assert sink.envelopes == 2
    assert sockets[0] is not None and sockets[0] is sockets[1], "the second envelope went over a new connection"
