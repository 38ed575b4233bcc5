"""LMTP (RFC 2033) on aiosmtpd's SMTP class: LHLO, one reply per recipient after the
message, CHUNKING (RFC 3030), and our exactly-once extension (XQUEUEID, XRETRY).

RFC 2033 §4.2: after the final dot the server answers once for every RCPT it accepted, in
order, refusals of the message included. ``BDAT <size> LAST`` carries the message counted, not
dot-stuffed, so a client sends MAIL, RCPT, BDAT and the message in one write without waiting
for a 354 (the queue runner does): one round trip a message instead of two. aiosmtpd's LMTP
class sends whatever ``handle_DATA`` returns as one reply, so the handler returns the
per-recipient lines joined with CRLF.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from aiosmtpd.smtp import Envelope, syntax

from mta.smtp import replies
from mta.smtp.data import MAX_TEXT_LINE, crlf_to_lf
from mta.smtp.server import DATA_ERRORS, BaseSMTP

log = logging.getLogger("pochta.mda")

QUEUE_ID = re.compile(r"[0-9a-f]{20}")


class LMTPEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.mailboxes: list[Any] = []  # the handler's, parallel to rcpt_tos
        self.lf_content: bytes | None = None  # the message with LF endings, once known
        self.chunks: list[bytes] = []  # BDAT chunks received so far
        self.queue_id = ""  # XQUEUEID: the MTA's id of the message
        self.retry = False  # XRETRY: copies of an earlier attempt may exist
        self.binary = False  # BODY=BINARYMIME (RFC 3030 §3): BDAT only, octets kept as sent


class LMTPProtocol(BaseSMTP):
    """aiosmtpd's SMTP speaking LMTP: LHLO instead of HELO/EHLO (RFC 2033 §4.1)."""

    def _create_envelope(self) -> LMTPEnvelope:
        return LMTPEnvelope()

    @syntax("LHLO hostname")
    async def smtp_LHLO(self, arg: str) -> None:
        await BaseSMTP.smtp_EHLO(self, arg)

    async def smtp_HELO(self, arg: str) -> None:
        await self.push(replies.NOT_LMTP.format(verb="HELO"))

    async def smtp_EHLO(self, arg: str) -> None:
        await self.push(replies.NOT_LMTP.format(verb="EHLO"))

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
                        await self.push(replies.BAD_QUEUE_ID)
                        return
                    envelope.queue_id = value
                elif i and not eq and key.upper() == "XRETRY":
                    envelope.retry = True
                elif i and eq and key.upper() == "BODY" and value.upper() == "BINARYMIME":
                    envelope.binary = True
                else:
                    kept.append(word)
            arg = " ".join(kept)
        await super().smtp_MAIL(arg)

    async def smtp_DATA(self, arg: str) -> None:
        envelope = self.envelope
        if isinstance(envelope, LMTPEnvelope) and envelope.binary:
            await self.push(replies.BINARYMIME_NEEDS_BDAT)
            return
        await super().smtp_DATA(arg)

    def data_refusal(self, reply: str) -> str:
        # RFC 2033 §4.2: after the message, one reply per accepted recipient, even when the
        # message itself is refused (the client waits for that many).
        assert self.envelope is not None
        return "\r\n".join([reply] * max(1, len(self.envelope.rcpt_tos)))

    @syntax("BDAT <size> [LAST]")
    async def smtp_BDAT(self, arg: str | None) -> None:
        parsed = await self.bdat_arguments(arg)
        if parsed is None:
            return
        size, last = parsed
        envelope = self.envelope
        assert isinstance(envelope, LMTPEnvelope)  # _create_envelope makes no other kind
        parts = envelope.chunks
        held = sum(map(len, parts))
        limit = self.data_size_limit  # None or 0: no limit
        too_big = limit is not None and 0 < limit < held + size
        await self.read_chunk(size, None if too_big else parts.append)
        if not self.session or not self.session.host_name:
            error = replies.NEED_LHLO
        elif not envelope.rcpt_tos:  # (RCPT needs MAIL)
            error = replies.NEED_MAIL_AND_RCPT
        elif too_big:
            error = self.data_refusal(DATA_ERRORS["size"])
        else:
            error = None
        if error is None and not last:
            await self.push(replies.CHUNK_RECEIVED.format(size=size))
            return
        if error is None:
            content = b"".join(parts)
            if envelope.binary:
                # Binary parts keep every octet; only the header section takes the
                # mailbox's LF form (a binary body has no lines to convert).
                head, sep, body = content.partition(b"\r\n\r\n")
                lf, problem = (head.replace(b"\r\n", b"\n") + b"\n\n" + body, None) if sep \
                    else (b"", "bare-eol")
            else:
                if not content.endswith(b"\r\n"):
                    content += b"\r\n"  # as after DATA: the CRLF before the dot is the message's
                # Checked as after DATA, and turned into a mailbox's LF form.
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
