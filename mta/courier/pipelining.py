"""Command pipelining (RFC 2920) over aiosmtplib's connection: MAIL, every RCPT and DATA in
one write, their replies read in order; then the message and its reply.

aiosmtplib reads one reply per command written: a reply that arrives while an earlier one
waits to be picked up is dropped (``SMTPProtocol.data_received``), so it cannot pipeline.
``KeepingProtocol`` keeps every byte in its buffer until a reply is asked for, which is what
pipelining needs; ``keep_replies`` gives a connection that protocol. Private names of
aiosmtplib 5 (``_buffer``, ``_response_waiter``, ``_command_lock``...) are relied on, as by
``send_bdat`` in remote.py; pyproject.toml keeps aiosmtplib below 6.

Without pipelining a message to a host whose connection is reused costs five round trips
(RSET, MAIL, RCPT, DATA, the message); with it two: RSET goes ahead of the envelope in the
same write, and a connection the host closed while idle shows there (``StaleConnection``:
nothing was taken, a fresh connection carries the message).
"""

from __future__ import annotations

from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.protocol import (
    MAX_RESPONSE_LENGTH,
    PERIOD_REGEX,
    SMTPProtocol,
    normalize_message_line_endings,
)


class KeepingProtocol(SMTPProtocol):
    """aiosmtplib's protocol, except that a reply is never dropped: bytes that come before
    their reply is asked for wait in the buffer, in order (RFC 2920 §3.1 replies)."""

    def data_received(self, data: bytes) -> None:
        if self._response_waiter is None:  # the connection is gone
            return
        self._buffer.extend(data)
        if len(self._buffer) > MAX_RESPONSE_LENGTH * 8:  # room for many RCPT replies at once
            del self._buffer[:]
            if not self._response_waiter.done():
                self._set_response_exception(self._response_waiter, aiosmtplib.SMTPResponseException(
                    aiosmtplib.SMTPStatus.invalid_response.value, "Response too long"))
            return
        self._hand_over()

    def _hand_over(self) -> None:
        """The first complete reply in the buffer to whoever waits for one."""
        waiter = self._response_waiter
        if waiter is None or waiter.done() or not self._response_pending:
            return
        try:
            response = self._read_response_from_buffer()
        except Exception as exc:  # a malformed reply: the reader gets the error
            self._set_response_exception(waiter, exc)
            return
        if response is not None:
            waiter.set_result(response)

    async def read_response(
            self, timeout: float | None = None,  # noqa: ASYNC109 (aiosmtplib's signature)
    ) -> aiosmtplib.SMTPResponse:
        self._response_pending = True
        self._hand_over()  # it may have come with an earlier one
        return await super().read_response(timeout)


def keep_replies(smtp: aiosmtplib.SMTP) -> None:
    """Make ``smtp``'s protocol a KeepingProtocol (the same object and state; only the class
    changes: aiosmtplib makes its protocol itself)."""
    protocol = smtp.protocol
    if protocol is not None and type(protocol) is SMTPProtocol:
        protocol.__class__ = KeepingProtocol


def pipelines(smtp: aiosmtplib.SMTP) -> bool:
    """Whether the envelope may go in one write: the host offers PIPELINING and the
    connection keeps replies."""
    return smtp.supports_extension("pipelining") and isinstance(smtp.protocol, KeepingProtocol)


class StaleConnection(aiosmtplib.SMTPException):
    """A reused connection did not answer the RSET sent ahead of the envelope: closed by the
    host while idle. Nothing of the transaction was taken; a fresh connection may try."""


RSET_LIMIT = 10.0  # seconds for the reply to the RSET that opens a reused connection


@dataclass(frozen=True)
class EnvelopeReplies:
    mail: aiosmtplib.SMTPResponse
    rcpts: list[aiosmtplib.SMTPResponse]
    data: aiosmtplib.SMTPResponse | None  # None: DATA was not sent (CHUNKING follows)


async def send_envelope(smtp: aiosmtplib.SMTP, mail: bytes, rcpts: list[bytes], data: bool,
                        limits: dict[str, float], reset: bool = False) -> EnvelopeReplies:
    """Write ``MAIL``, the ``RCPT`` lines and (``data``) ``DATA`` at once, after ``RSET`` on
    a reused connection (``reset``); read their replies. Every reply is read whatever the
    earlier ones said, so that the session stays in step. A 354 to DATA with nothing accepted
    is ended with an empty message, as RFC 2920 §3.1 asks. ``StaleConnection`` when the RSET
    gets no 250."""
    protocol = _protocol(smtp)
    lines = [*([b"RSET"] if reset else []), mail, *rcpts, *([b"DATA"] if data else [])]
    for line in lines:
        if aiosmtplib.protocol.COMMAND_INJECTION_REGEX.search(line):
            raise ValueError("command contains a control character")
    try:
        async with protocol._command_lock:  # type: ignore[union-attr]
            protocol._response_pending = True
            protocol.write(b"".join(line + b"\r\n" for line in lines))
            if reset:
                try:
                    rset = await protocol.read_response(timeout=min(RSET_LIMIT, limits["mail"]))
                except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as e:
                    smtp.close()
                    raise StaleConnection(f"no reply to RSET: {e}") from None
                if rset.code != 250:
                    smtp.close()
                    raise StaleConnection(f"RSET answered {rset.code} {rset.message}")
            mail_reply = await protocol.read_response(timeout=limits["mail"])
            rcpt_replies = [await protocol.read_response(timeout=limits["rcpt"])
                            for _ in rcpts]
            data_reply = await protocol.read_response(timeout=limits["data"]) if data else None
            if data_reply is not None and data_reply.code == 354 and not (
                    mail_reply.code == 250 and any(r.code in (250, 251) for r in rcpt_replies)):
                protocol._response_pending = True
                protocol.write(b".\r\n")
                await protocol.read_response(timeout=limits["data"])
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        raise
    return EnvelopeReplies(mail_reply, rcpt_replies, data_reply)


async def send_message(smtp: aiosmtplib.SMTP, message: bytes, limit: float
                       ) -> aiosmtplib.SMTPResponse:
    """The message after a 354 (line endings made CRLF, dot-stuffed, ended with ".") and its
    reply, as aiosmtplib's ``data`` sends it after its own DATA."""
    protocol = _protocol(smtp)
    payload = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"
    try:
        async with protocol._command_lock:  # type: ignore[union-attr]
            protocol._response_pending = True
            protocol.write(payload)
            return await protocol.read_response(timeout=limit)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        raise


def _protocol(smtp: aiosmtplib.SMTP) -> SMTPProtocol:
    protocol = smtp.protocol
    if protocol is None or protocol._command_lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    return protocol
