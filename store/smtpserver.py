"""What the MTA, MSA and MDA listeners share on top of aiosmtpd's SMTP class.

- every reply carries an RFC 3463 enhanced status code (aiosmtpd's built-in replies mostly
  don't), except the greeting, EHLO/LHLO lines and intermediate 334/354 replies (RFC 2034 §3);
- a ``Connections`` registry that caps sessions in total and per client IP (421 4.7.0), and
  says 421 to every open session at shutdown;
- an idle timeout that says 421 4.4.2 before closing (RFC 5321 §4.5.3.2) instead of vanishing;
- ``start_listeners`` for "host:port" and "unix:/path" addresses.

Our own policy replies are written with their codes (see ``mta/replies.py``); this module only
fills in aiosmtpd's defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import ssl
import stat
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from aiosmtpd.smtp import SMTP

from store.config import parse_address

log = logging.getLogger("pochta.smtp")

_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
# The enhanced code for aiosmtpd's built-in replies that lack one, by basic code.
DEFAULT_ENHANCED = {
    "211": "2.0.0", "214": "2.0.0", "221": "2.0.0", "235": "2.7.0", "250": "2.0.0",
    "251": "2.1.5", "252": "2.5.0",
    "421": "4.3.0", "450": "4.2.0", "451": "4.3.0", "452": "4.3.1", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "535": "5.7.8", "538": "5.7.11", "550": "5.0.0", "552": "5.3.4",
    "553": "5.1.3", "554": "5.0.0", "555": "5.5.4",
}
NO_ENHANCED = {"220", "334", "354"}


def with_enhanced_code(line: str) -> str:
    """Add the default enhanced status code to one reply line that has none."""
    code = line[:3]
    if code in NO_ENHANCED or _HAS_ENHANCED.match(line) or code not in DEFAULT_ENHANCED:
        return line
    sep, text = line[3:4] or " ", line[4:]
    return f"{code}{sep}{DEFAULT_ENHANCED[code]} {text}".rstrip()


class Connections:
    """Open sessions of one server process: limits on entry, a 421 to each at shutdown."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.open: set[BaseSMTP] = set()
        self.per_ip: Counter[str] = Counter()
        self.closing = False

    def admit(self, proto: BaseSMTP) -> str | None:
        """Register ``proto``; return a refusal reply if a limit is reached."""
        if self.closing:
            return "421 4.3.2 Service shutting down"
        ip = proto.peer_ip
        if self.max_total and len(self.open) >= self.max_total:
            return "421 4.7.0 Too many connections, try again later"
        if self.max_per_ip and ip and self.per_ip[ip] >= self.max_per_ip:
            return "421 4.7.0 Too many connections from your address, try again later"
        self.open.add(proto)
        if ip:
            self.per_ip[ip] += 1
        return None

    def release(self, proto: BaseSMTP) -> None:
        if proto in self.open:
            self.open.discard(proto)
            ip = proto.peer_ip
            if ip:
                self.per_ip[ip] -= 1
                if self.per_ip[ip] <= 0:
                    del self.per_ip[ip]

    def shutdown(self, hostname: str) -> None:
        """Tell every open session we are going away (RFC 5321 §3.8) and close it."""
        self.closing = True
        for proto in list(self.open):
            proto.say_and_close(f"421 4.3.2 {hostname} Service shutting down")


class BaseSMTP(SMTP):
    """aiosmtpd's SMTP with enhanced status codes, connection limits and a polite timeout."""

    def __init__(self, handler: Any, *, connections: Connections, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.connections = connections
        self.peer_ip = ""
        self._in_greeting_reply = False
        self._admitted = False

    # -- connection lifecycle -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first:
            peer = transport.get_extra_info("peername")
            self.peer_ip = peer[0] if isinstance(peer, tuple) else ""
        super().connection_made(transport)

    async def _handle_client(self) -> None:
        refusal = self.connections.admit(self)
        if refusal is not None:
            log.info("refused connection from %s: %s", self.peer_ip or "local", refusal)
            await self.push(refusal)
            self._close_transport()
            return
        self._admitted = True
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        self.connections.release(self)
        super().connection_lost(error)

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def say_and_close(self, reply: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        with contextlib.suppress(Exception):
            self._writer.write(reply.encode() + b"\r\n")
        self._close_transport()

    def _timeout_cb(self) -> None:
        # RFC 5321 §4.5.3.2: the server may close an idle session; say so with a 421.
        log.info("%s idle timeout", self.peer_ip or "local")
        self.say_and_close(f"421 4.4.2 {self.hostname} Error: timeout exceeded")

    # -- replies ------------------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str) and not self._in_greeting_reply:
            status = "\r\n".join(with_enhanced_code(line) for line in status.split("\r\n"))
        await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_greeting_reply = bool(hostname)  # 501 for a missing name still gets a code
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_greeting_reply = False


async def start_listeners(
    addresses: Iterable[str],
    factory: Callable[[], asyncio.Protocol],
    *,
    ssl_context: ssl.SSLContext | None = None,
    key: str = "listen",
) -> list[asyncio.base_events.Server]:
    """Listen on each "host:port" or "unix:/path"; a stale unix socket file is replaced."""
    loop = asyncio.get_running_loop()
    servers = []
    for addr in addresses:
        if addr.startswith("unix:"):
            path = addr[len("unix:"):]
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            old = os.umask(0o117)  # socket mode 0660: owner and group only
            try:
                srv = await loop.create_unix_server(factory, path, ssl=ssl_context)
            finally:
                os.umask(old)
        else:
            host, port = parse_address(addr, key)
            srv = await loop.create_server(factory, host, port, ssl=ssl_context,
                                           reuse_address=True, backlog=512,
                                           family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        servers.append(srv)
    return servers
