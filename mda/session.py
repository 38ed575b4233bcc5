"""The LMTP session's policy: RCPT accepts exactly the enabled mailboxes (``user+tag``
included; aliases were expanded by the MTA), DATA stores one copy per recipient and answers
one reply each. The protocol itself is mta/smtp/lmtp.py.
"""

from __future__ import annotations

import asyncio
import logging

from mda.deliver import Deliverer, Job, delivery_key
from mda.filtering import SieveDelivery
from mda.message import to_lf
from mta.smtp import Session, replies
from mta.smtp.lmtp import LMTPEnvelope, LMTPProtocol
from mta.smtp.server import Handler
from store import addresses
from store.batching import Batcher
from store.directory import Directory, DirectoryUnavailable, lookup

log = logging.getLogger("pochta.mda")

class LMTPHandler(Handler):
    def __init__(self, directory: Directory, deliverer: Deliverer,
                 sieve: SieveDelivery | None = None) -> None:
        self.directory = directory
        self.deliverer = deliverer
        self.sieve = sieve  # users with an active Sieve script: their copies go through it
        # maildir copies of concurrent sessions share a thread hop and their fsyncs; mbox
        # copies go one thread each, since one may wait for a mailbox lock held elsewhere.
        self.maildir_batches: Batcher[Job, str] = Batcher(deliverer.deliver_batch)

    async def handle_EHLO(self, server: LMTPProtocol, session: Session, envelope: LMTPEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-CHUNKING",
                "250-BINARYMIME", "250-XQUEUEID", responses[-1]]

    async def handle_MAIL(self, server: LMTPProtocol, session: Session, envelope: LMTPEnvelope,
                          address: str, mail_options: list[str]) -> str:
        envelope.mail_from = address  # (a hook that answers must record it itself)
        envelope.mail_options.extend(mail_options)
        return replies.LMTP_SENDER_OK  # RFC 3463: 2.1.0, not aiosmtpd's plain "250 OK"

    async def handle_RCPT(self, server: LMTPProtocol, session: Session, envelope: LMTPEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        try:
            rcpt = addresses.normalize(address)
        except addresses.AddressError:
            return replies.MALFORMED_RCPT.format(addr=address)
        try:
            mailbox = await lookup(self.directory, "mailbox", rcpt)
        except DirectoryUnavailable as e:
            log.error("directory unavailable at RCPT <%s>: %s", rcpt, e)
            return replies.DIRECTORY_UNAVAILABLE
        if mailbox is None:
            return replies.NO_SUCH_MAILBOX.format(addr=address)
        envelope.rcpt_tos.append(rcpt)
        envelope.rcpt_options.extend(rcpt_options)
        envelope.mailboxes.append(mailbox)
        return replies.LMTP_RCPT_OK

    async def handle_DATA(self, server: LMTPProtocol, session: Session,
                          envelope: LMTPEnvelope) -> str:
        try:
            return await self._deliver(envelope)
        except Exception:
            # Never aiosmtpd's "500 Error: (PermissionError) <path>": every recipient would
            # bounce for what is a local, temporary problem, and the reply would leak a path.
            log.exception("delivery failed for %d recipient(s)", len(envelope.rcpt_tos))
            return server.data_refusal(replies.DELIVERY_LOCAL_ERROR)

    async def handle_exception(self, error: Exception) -> str:
        log.exception("LMTP session error: %r", error)
        return replies.DELIVERY_LOCAL_ERROR

    async def _deliver(self, envelope: LMTPEnvelope) -> str:
        data = envelope.lf_content
        if data is None:  # after DATA, which checked it
            assert isinstance(envelope.content, bytes)
            data = to_lf(envelope.content)
        mail_from = envelope.mail_from or "<>"
        jobs = [Job(mb, rcpt, mail_from, data, delivery_key(envelope.queue_id, rcpt),
                    envelope.retry)
                for mb, rcpt in zip(envelope.mailboxes, envelope.rcpt_tos, strict=True)]
        sieve = self.sieve
        replies = await asyncio.gather(*(
            sieve.deliver(j) if sieve is not None and sieve.applies(j)
            else self.maildir_batches.submit(j) if self.deliverer.format == "maildir"
            else asyncio.to_thread(self.deliverer.deliver, j)
            for j in jobs))
        return "\r\n".join(replies)  # RFC 2033 §4.2: one reply per accepted RCPT, in order
