"""The LMTP session: policy at RCPT, one reply per accepted recipient after DATA.

RFC 2033 §4.2: after the final dot the server answers once for every RCPT it accepted, in
order. CHUNKING (RFC 3030): ``BDAT <size> LAST`` carries the message counted, not dot-stuffed,
so a client sends MAIL, RCPT, BDAT and the message in one write without waiting for a 354 (the
queue runner does): one round trip a message instead of two, and no dot (un)stuffing.
aiosmtpd's LMTP class sends whatever ``handle_DATA`` returns as one reply, so we return the
per-recipient lines joined with CRLF. The MDA delivers to mailboxes only: aliases were
expanded by the MTA, so RCPT accepts exactly the enabled mailboxes (``user+tag`` included).
"""

from __future__ import annotations

import asyncio
import logging
import re

from aiosmtpd.smtp import Envelope, Session, syntax

from mda.deliver import Deliverer, Job, delivery_key
from mda.message import to_lf
from store import addresses
from store.batching import Batcher
from store.dataread import MAX_TEXT_LINE, crlf_to_lf
from store.directory import Directory, DirectoryUnavailable, UserInfo, lookup
from store.smtpserver import DATA_ERRORS, BaseSMTP

log = logging.getLogger("pochta.mda")

LOCAL_ERROR = "451 4.3.0 Local error in delivery, try again later"
BDAT_ARGS = re.compile(r"(\d{1,10})(?: +(LAST))?", re.IGNORECASE)


QUEUE_ID = re.compile(r"[0-9a-f]{20}")


class LMTPEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.mailboxes: list[UserInfo] = []  # parallel to rcpt_tos
        self.lf_content: bytes | None = None  # the message with LF endings, once known
        self.chunks: list[bytes] = []  # BDAT chunks received so far
        self.queue_id = ""  # XQUEUEID: the MTA's id of the message
        self.retry = False  # XRETRY: copies of an earlier attempt may exist


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

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        """aiosmtpd's MAIL, plus our extension for exactly-once delivery (advertised in LHLO):
        ``XQUEUEID=<id>`` names each copy after the queue id and its recipient, and
        ``XRETRY`` says an earlier attempt may have made some of those copies already.

        They are taken out of the line before aiosmtpd sees it (it refuses unknown
        parameters)."""
        envelope = self.envelope
        assert isinstance(envelope, LMTPEnvelope)  # _create_envelope makes no other kind
        if arg and not envelope.mail_from:
            kept = []
            for i, word in enumerate(arg.split(" ")):
                key, eq, value = word.partition("=")
                if i and eq and key.upper() == "XQUEUEID":
                    if not QUEUE_ID.fullmatch(value):
                        await self.push("501 5.5.4 Malformed XQUEUEID")
                        return
                    envelope.queue_id = value
                elif i and not eq and key.upper() == "XRETRY":
                    envelope.retry = True
                else:
                    kept.append(word)
            arg = " ".join(kept)
        await super().smtp_MAIL(arg)

    def data_refusal(self, reply: str) -> str:
        # RFC 2033 §4.2: after the message, one reply per accepted recipient, even when the
        # message itself is refused (the client waits for that many).
        assert self.envelope is not None
        return "\r\n".join([reply] * max(1, len(self.envelope.rcpt_tos)))

    @syntax("BDAT <size> [LAST]")
    async def smtp_BDAT(self, arg: str | None) -> None:
        m = BDAT_ARGS.fullmatch((arg or "").strip())
        if m is None:  # the chunk's length is unknown: what follows cannot be skipped
            await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]")
            self._close_transport()
            return
        size, last = int(m.group(1)), m.group(2) is not None
        envelope = self.envelope
        assert isinstance(envelope, LMTPEnvelope)  # _create_envelope makes no other kind
        parts = envelope.chunks
        held = sum(map(len, parts))
        limit = self.data_size_limit  # None or 0: no limit
        too_big = limit is not None and 0 < limit < held + size
        remaining = size
        with self.reading_data():
            while remaining:  # the chunk is read whatever the reply: data, not commands
                block = await self._reader.read(min(remaining, 1 << 16))
                if not block:
                    raise ConnectionResetError("connection closed within a BDAT chunk")
                remaining -= len(block)
                self._reset_timeout()
                if not too_big:
                    parts.append(block)
        if not self.session or not self.session.host_name:
            error = "503 5.5.1 Error: send LHLO first"
        elif not envelope.rcpt_tos:  # (RCPT needs MAIL)
            error = "503 5.5.1 Need MAIL and an accepted RCPT first"
        elif too_big:
            error = self.data_refusal(DATA_ERRORS["size"])
        else:
            error = None
        if error is None and not last:
            await self.push(f"250 2.0.0 {size} octets received")
            return
        if error is None:
            content = b"".join(parts)
            if not content.endswith(b"\r\n"):
                content += b"\r\n"  # as after DATA: the CRLF before the dot is the message's
            # Checked as after DATA (no BINARYMIME), and turned into a mailbox's LF form.
            lf, problem = crlf_to_lf(content, MAX_TEXT_LINE)
            if problem is None:
                envelope.content = envelope.original_content = content
                envelope.lf_content = lf
                error = await self._call_handler_hook("DATA")
            else:
                log.info("%s: BDAT refused (%s, %d octets)", self.peer_ip, problem, len(content))
                error = self.data_refusal(DATA_ERRORS[problem])
        parts.clear()
        self._set_post_data_state()  # RFC 3030 §2: a failed BDAT ends the transaction
        await self.push(error)


class LMTPHandler:
    def __init__(self, directory: Directory, deliverer: Deliverer) -> None:
        self.directory = directory
        self.deliverer = deliverer
        # maildir copies of concurrent sessions share a thread hop and their fsyncs; mbox
        # copies go one thread each, since one may wait for a mailbox lock held elsewhere.
        self.maildir_batches: Batcher[Job, str] = Batcher(deliverer.deliver_batch)

    async def handle_EHLO(self, server: LMTPProtocol, session: Session, envelope: LMTPEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-CHUNKING",
                "250-XQUEUEID", responses[-1]]

    async def handle_MAIL(self, server: LMTPProtocol, session: Session, envelope: LMTPEnvelope,
                          address: str, mail_options: list[str]) -> str:
        envelope.mail_from = address  # (a hook that answers must record it itself)
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"  # RFC 3463: 2.1.0, not aiosmtpd's plain "250 OK"

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
        try:
            return await self._deliver(envelope)
        except Exception:
            # Never aiosmtpd's "500 Error: (PermissionError) <path>": every recipient would
            # bounce for what is a local, temporary problem, and the reply would leak a path.
            log.exception("delivery failed for %d recipient(s)", len(envelope.rcpt_tos))
            return server.data_refusal(LOCAL_ERROR)

    async def handle_exception(self, error: Exception) -> str:
        log.exception("LMTP session error: %r", error)
        return LOCAL_ERROR

    async def _deliver(self, envelope: LMTPEnvelope) -> str:
        data = envelope.lf_content
        if data is None:  # after DATA, which checked it
            assert isinstance(envelope.content, bytes)
            data = to_lf(envelope.content)
        mail_from = envelope.mail_from or "<>"
        jobs = [Job(mb, rcpt, mail_from, data, delivery_key(envelope.queue_id, rcpt),
                    envelope.retry)
                for mb, rcpt in zip(envelope.mailboxes, envelope.rcpt_tos, strict=True)]
        if self.deliverer.format == "maildir":
            replies = await asyncio.gather(*(self.maildir_batches.submit(j) for j in jobs))
        else:
            replies = await asyncio.gather(*(asyncio.to_thread(self.deliverer.deliver, j)
                                             for j in jobs))
        return "\r\n".join(replies)  # RFC 2033 §4.2: one reply per accepted RCPT, in order
