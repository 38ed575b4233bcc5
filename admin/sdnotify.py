"""systemd's readiness protocol (sd_notify(3)): one datagram to $NOTIFY_SOCKET.

With ``Type=notify`` units (``pochta systemd-units``) systemd considers a process started
when it says READY=1 (its listeners bound, its privileges dropped) and knows a stop is under
way from STOPPING=1. Without NOTIFY_SOCKET (run by hand, by ``pochta up``) this does nothing.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1"); False if there is no socket or it failed."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(5.0)
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True
