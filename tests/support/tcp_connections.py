"""The machine's TCP connections, as the kernel lists them: what a test sees of a client it cannot reach into."""

from __future__ import annotations

from pathlib import Path

_ESTABLISHED = "01"  # the `st` column of /proc/net/tcp


def open_connections_to(port: int) -> int:
    """How many IPv4 connections to `port` on this machine are established, seen from their client's end."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        _, _, remote, state, *_ = line.split()
        if state == _ESTABLISHED and int(remote.rsplit(":", 1)[1], 16) == port:
            count += 1
    return count
