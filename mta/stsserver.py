"""``[mta_sts] listen``: our MTA-STS policy over HTTPS (RFC 8461 §3.3), in the MSA process.

``https://mta-sts.<domain>/.well-known/mta-sts.txt`` for each of our domains, with our
certificate (ACME covers the ``mta-sts.`` names when this listener is on), the policy that
``pochta dns`` prints. Anything else is a 404; a client gets 10 seconds and 8 KB of request,
and at most 100 connections are served at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable

import h11

from mta.mtasts import published_policy
from store.config import Config, parse_address
from store.directory import Directory, DirectoryUnavailable, lookup

log = logging.getLogger("pochta.mta-sts")

PATH = "/.well-known/mta-sts.txt"
REQUEST_TIMEOUT = 10.0
MAX_REQUEST = 8192
MAX_CONNECTIONS = 100


class PolicyServer:
    def __init__(self, config: Callable[[], Config], directory: Directory) -> None:
        self.config = config  # the current one: a reload changes the policy served
        self.directory = directory
        self.slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def start(self, context: ssl.SSLContext) -> list[asyncio.base_events.Server]:
        servers = []
        for addr in self.config().mta_sts.listen:
            host, port = parse_address(addr, "mta_sts.listen")
            servers.append(await asyncio.start_server(
                self.serve, host, port, ssl=context, reuse_address=True,
                ssl_handshake_timeout=REQUEST_TIMEOUT))
        return servers

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.slots.locked():
            writer.close()
            return
        async with self.slots:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await self._exchange(reader, writer)
            except (TimeoutError, OSError, h11.ProtocolError, ssl.SSLError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 2)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                        ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(4096)
                conn.receive_data(data)
                if not data:
                    return
                continue
            if isinstance(event, h11.Request):
                break
            if isinstance(event, h11.ConnectionClosed):
                return
        host = dict(event.headers).get(b"host", b"").decode("ascii", "replace")
        status, body = await self.answer(event.method.decode("ascii", "replace"),
                                         event.target.decode("ascii", "replace"), host)
        headers = [("Content-Type", "text/plain; charset=utf-8"),
                   ("Content-Length", str(len(body))), ("Connection", "close"),
                   ("Cache-Control", "max-age=3600")]
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
        if event.method != b"HEAD":
            writer.write(conn.send(h11.Data(data=body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()

    async def answer(self, method: str, target: str, host: str) -> tuple[int, bytes]:
        """The status and body for one request."""
        name = host.split(":")[0].lower().rstrip(".")
        if method not in ("GET", "HEAD") or target != PATH or not name.startswith("mta-sts."):
            return 404, b"not found\n"
        try:
            ours = await lookup(self.directory, "is_local_domain", name[len("mta-sts."):])
        except DirectoryUnavailable:
            return 503, b"try again later\n"
        if not ours:
            return 404, b"not found\n"
        cfg = self.config()
        return 200, published_policy(cfg.hostname, cfg.acme.enabled).encode()
