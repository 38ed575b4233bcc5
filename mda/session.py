"""The LMTP session: policy at RCPT, one reply per accepted recipient after DATA.

RFC 2033 §4.2: after the final dot the server answers once for every RCPT it accepted, in
order. aiosmtpd's LMTP class sends whatever ``handle_DATA`` returns as one reply, so we return
the per-recipient lines joined with CRLF. The MDA delivers to mailboxes only: aliases were
expanded by the MTA, so RCPT accepts exactly the enabled mailboxes (``user+tag`` included).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiosmtpd.smtp import Envelope, Session, syntax

from mda.deliver import Deliverer, Job
from store import addresses
from store.batching import Batcher
from store.directory import Directory, DirectoryUnavailable, UserInfo, lookup
from store.smtpserver import BaseSMTP

log = logging.getLogger("pochta.mda")


class LMTPEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.mailboxes: list[UserInfo] = []  # parallel to rcpt_tos


class LMTPProtocol(BaseSMTP):
    """aiosmtpd's SMTP speaking LMTP: LHLO instead of HELO/EHLO (RFC 2033 §4.1)."""

    def _create_envelope(self) -> LMTPEnvelope:
        return LMTPEnvelope()

    @syntax("LHLO hostname")
    async def smtp_LHLO(self, arg: str) -> None:
        await BaseSMTP.smtp_EHLO(self, arg)

    async def smtp_HELO(self, arg: str) -> None:
        await self.push('500 5.5.1 Error: command "HELO" not recognized, this is LMTP')

    async def smtp_EHLO(self, arg: str) -> None:
        await self.push('500 5.5.1 Error: command "EHLO" not recognized, this is LMTP')


class LMTPHandler:
    def __init__(self, directory: Directory, deliverer: Deliverer) -> None:
        self.directory = directory
        self.deliverer = deliverer
        # maildir copies of concurrent sessions share a thread hop and their fsyncs; mbox
        # copies go one thread each, since one may wait for a mailbox lock held elsewhere.
        self.maildir_batches: Batcher[Job, str] = Batcher(deliverer.deliver_batch)

    async def handle_RCPT(self, server: LMTPProtocol, session: Session, envelope: LMTPEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        try:
            rcpt = addresses.normalize(address)
        except addresses.AddressError:
            return f"553 5.1.3 <{address}> Malformed address"
        try:
            mailbox = await lookup(self.directory, "mailbox", rcpt)
        except DirectoryUnavailable as e:
            log.error("directory unavailable at RCPT <%s>: %s", rcpt, e)
            return "451 4.3.0 Directory temporarily unavailable, try again later"
        if mailbox is None:
            return f"550 5.1.1 <{address}> No such mailbox here"
        envelope.rcpt_tos.append(rcpt)
        envelope.rcpt_options.extend(rcpt_options)
        envelope.mailboxes.append(mailbox)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: LMTPProtocol, session: Session,
                          envelope: LMTPEnvelope) -> str:
        data: Any = envelope.content
        assert isinstance(data, bytes)
        mail_from = envelope.mail_from or "<>"
        jobs = [Job(mb, rcpt, mail_from, data)
                for mb, rcpt in zip(envelope.mailboxes, envelope.rcpt_tos, strict=True)]
        if self.deliverer.format == "maildir":
            replies = await asyncio.gather(*(self.maildir_batches.submit(j) for j in jobs))
        else:
            replies = await asyncio.gather(*(asyncio.to_thread(self.deliverer.deliver, j)
                                             for j in jobs))
        return "\r\n".join(replies)  # RFC 2033 §4.2: one reply per accepted RCPT, in order
