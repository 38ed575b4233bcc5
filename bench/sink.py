"""The benchmarks' remote MX: a minimal SMTP server (PIPELINING, STARTTLS when given a
context) that counts what it is sent. Not a test double: it takes everything."""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import Counter
from collections.abc import Callable

MESSAGE_ID = re.compile(rb"Message-ID: <([^>]+)>", re.IGNORECASE)


class SinkSessions:
    """``session`` serves one connection. Counted: messages, their Message-IDs, connections,
    and the most transactions one recipient domain had at the same time."""

    def __init__(self, tls: ssl.SSLContext | None = None, delay: float = 0.0,
                 on_message: Callable[[], None] = lambda: None, rtt: float = 0.0) -> None:
        self.tls = tls
        self.delay = delay  # before the 250 to DATA: a slow host
        # A distant host: each time the client waits for replies (it has sent no further
        # command), they reach it one round trip later. A client that pipelines waits less.
        self.rtt = rtt
        self.on_message = on_message
        self.count = 0
        self.connections = 0
        self.ids: Counter[str] = Counter()
        self.active: Counter[str] = Counter()
        self.most_at_once = 0

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        domains: set[str] = set()
        secure = False

        def end_transaction() -> None:
            for d in domains:
                self.active[d] -= 1
            domains.clear()

        try:
            writer.write(b"220 sink.test ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    offer = b"250-STARTTLS\r\n" if self.tls and not secure else b""
                    writer.write(b"250-sink.test\r\n250-PIPELINING\r\n" + offer +
                                 b"250 8BITMIME\r\n")
                elif verb == b"STAR" and self.tls and not secure:
                    writer.write(b"220 2.0.0 go ahead\r\n")
                    await writer.drain()
                    await writer.start_tls(self.tls)
                    secure = True
                    continue
                elif verb == b"RCPT":
                    domain = line.split(b"@")[-1].split(b">")[0].decode().lower()
                    if domain not in domains:
                        domains.add(domain)
                        self.active[domain] += 1
                        self.most_at_once = max(self.most_at_once, self.active[domain])
                    writer.write(b"250 2.1.5 ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    if self.rtt:
                        await asyncio.sleep(self.rtt)
                    await writer.drain()
                    data = await reader.readuntil(b"\r\n.\r\n")
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    m = MESSAGE_ID.search(data)
                    self.ids[m.group(1).decode() if m else "?"] += 1
                    self.count += 1
                    self.on_message()
                    end_transaction()
                    writer.write(b"250 2.0.0 stored\r\n")
                elif verb == b"RSET":
                    end_transaction()
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    break
                else:
                    writer.write(b"250 2.0.0 ok\r\n")
                # The client waits once it sent all it had (asyncio's buffer, a private name).
                if self.rtt and b"\n" not in reader._buffer:  # type: ignore[attr-defined]
                    await asyncio.sleep(self.rtt)
                await writer.drain()
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            end_transaction()
            writer.close()
