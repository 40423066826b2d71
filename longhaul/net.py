"""Free ports for the servers and rendezvous a run opens (weight-transfer groups, metrics, test servers)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that nothing listens on right now: bound and released at once, so the caller must bind it
    soon (another process could take it in between; for a rendezvous that fails loudly, not silently)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
