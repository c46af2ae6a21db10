"""Which of the broker's refusals last until someone fixes them (reported), and which pass (only logged)."""

from __future__ import annotations

import pytest
from pika.exceptions import (
    AMQPConnectionError,
    ChannelClosedByBroker,
    ConnectionClosedByBroker,
    ProbableAccessDeniedError,
    ProbableAuthenticationError,
)

from shared.messaging.topology import broker_refuses


@pytest.mark.parametrize(
    ("failure", "lasting"),
    [
        (ProbableAuthenticationError("ACCESS_REFUSED - Login was refused"), True),
        (ProbableAccessDeniedError("NOT_ALLOWED - vhost callflow not found"), True),
        (ConnectionClosedByBroker(530, "NOT_ALLOWED - vhost callflow not found"), True),
        (ChannelClosedByBroker(403, "ACCESS_REFUSED - access to exchange 'callflow.events' refused"), True),
        (ChannelClosedByBroker(406, "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue"), True),
        (ChannelClosedByBroker(406, "PRECONDITION_FAILED - unknown delivery tag 3"), False),
        (ConnectionClosedByBroker(320, "CONNECTION_FORCED - broker forced connection closure"), False),
        (AMQPConnectionError("connection refused"), False),
        (OSError("network unreachable"), False),
    ],
)
def test_only_a_refusal_no_retry_mends_is_lasting(failure, lasting):
    assert broker_refuses(failure) is lasting
