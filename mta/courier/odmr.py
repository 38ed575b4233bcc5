"""Delivery over a connection an ODMR customer turned around (RFC 2645 ATRN).

The MSA process keeps the customer's TLS connection and passes its bytes through a socket
pair (mta/odmr.py); the queue runner gets the other end with the ``!atrn`` notice and, as the
SMTP client, delivers the domain's held messages one transaction after another over it. This is
a courier like the others, so the runner records each recipient's reply as for any delivery
(2xx sent, 4xx kept, 5xx bounced). Once the connection is broken the courier says so, and
the messages not tried yet stay queued untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import aiosmtplib

from mta.courier.remote import Outbound
from mta.envelope import Envelope, Recipient
from mta.reply import LOCAL_DECISION, Reply
from mta.spool import SpooledMessage

log = logging.getLogger("pochta.odmr")


class TurnedConnection:
    def __init__(self, outbound: Outbound, channel: socket.socket, client: str) -> None:
        self.outbound = outbound
        self.channel = channel
        self.relay = f"ATRN[{client}]"
        timeouts = outbound.timeouts
        self.smtp = aiosmtplib.SMTP(sock=channel, local_hostname=outbound.cfg.hostname,
                                    timeout=timeouts["greeting"], use_tls=False, start_tls=False)
        self.broken = False
        self.transactions = 0

    async def open(self) -> bool:
        """The customer's greeting and our EHLO; False (and broken) if that fails."""
        try:
            await self.smtp.connect(timeout=self.outbound.timeouts["greeting"])
            try:
                await self.smtp.ehlo()
            except aiosmtplib.SMTPResponseException:
                await self.smtp.helo()
            return True
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            log.info("%s: no SMTP session: %s", self.relay, e)
            self.broken = True
            return False

    async def deliver(self, env: Envelope, rcpts: list[Recipient], data: bytes | SpooledMessage,
                      retry: bool = False) -> dict[str, Reply]:
        if self.broken:
            lost = Reply(451, "4.4.2 the ATRN connection was lost", LOCAL_DECISION)
            return {r.address: lost for r in rcpts}
        if isinstance(data, SpooledMessage):
            data = await asyncio.to_thread(data.read)

        def reply(code: int, text: str) -> Reply:
            return Reply(code, text, self.relay)

        def refuse(code: int, text: str) -> Reply:
            return Reply(code, f"{text} ({self.relay})", LOCAL_DECISION)

        try:
            if self.transactions:
                await self.smtp.rset()  # whatever the last transaction left (refused RCPTs)
            self.transactions += 1
            # The customer proved who it is (AUTH under TLS): REQUIRETLS mail may go to it.
            return await self.outbound.transaction(env, self.smtp, rcpts, data, reply, refuse,
                                                   authenticated=True)
        except aiosmtplib.SMTPResponseException as e:
            # MAIL or DATA refused: this message's recipients get that reply; the session
            # goes on (a 421 ends it: aiosmtplib closes on it).
            self.broken = not self.smtp.is_connected
            r = reply(e.code, e.message)
            return {x.address: r for x in rcpts}
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            self.broken = True
            r = reply(451, f"4.4.2 ATRN connection lost: {e}")
            return {x.address: r for x in rcpts}

    async def close(self) -> None:
        if self.smtp.is_connected:
            try:
                await self.smtp.quit(timeout=30)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                self.smtp.close()
        with contextlib.suppress(OSError):
            self.channel.close()
