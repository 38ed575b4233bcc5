"""aiosmtpd's SMTP class, extended where 1.4.6 falls short for a public MX and for submission.

Wire-level only; every policy decision is the handler's (``mta/session.py``).

- command lines ending in a bare LF are refused (500 5.5.2), never taken as a command;
- RCPT takes DSN parameters (NOTIFY, ORCPT) and refuses source routes before aiosmtpd's parser
  silently drops them; EXPN and TURN get real handling; STARTTLS works once per session;
- a session with too many errors is told 421 and closed (RFC 5321 §4.5.3.2 spirit, chasquid);
- AUTH exists only where the handler allows it (the submission ports).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from aiosmtpd.smtp import MISSING, Envelope, syntax

from mta.smtp import replies
from mta.smtp.data import ChunkCollector
from mta.smtp.server import DATA_ERRORS, BaseSMTP

log = logging.getLogger("pochta.smtp")

# Commands a client may repeat this often per connection before we hang up (421).
CALL_LIMITS = {"NOOP": 100, "RSET": 500, "VRFY": 30, "EXPN": 30, "HELP": 30, "EHLO": 30, "ETRN": 10,
               "HELO": 30, "STARTTLS": 5, "AUTH": 10, "*": 1_000_000}


class BadCommandLine(Exception):
    """A command line refused before any verb sees it; ``reply`` says why."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class BareLineFeed(BadCommandLine):
    """A command line that ended in LF without CR."""

    def __init__(self) -> None:
        super().__init__(replies.BARE_LF_COMMAND)


# Inside a command line: no CR, LF or other control character but TAB (a bare CR in HELO
# would end up in our Received and Authentication-Results headers).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class StrictLineReader:
    """Wraps the session's StreamReader: command lines must end in CRLF.

    aiosmtpd reads commands with ``readuntil()`` and strips any line ending; this proxy raises
    ``BareLineFeed`` instead, which the handler's ``handle_exception`` turns into a 500 reply.
    A line holding a control character or bytes that are not UTF-8 is refused the same way
    (``BadCommandLine``): no verb, header or spool file ever sees such an argument.
    Everything else (DATA reads, STARTTLS buffer handling) goes to the real reader.
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        object.__setattr__(self, "_real", reader)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        line = await self._real.readuntil(separator)
        if separator == b"\n" and not line.endswith(b"\r\n"):
            # "NOOP\nQUIT\r\n" is one malformed line, not two commands: drop what was sent
            # with it up to its CRLF, if that is already here (a client waiting for our
            # answer to "EHLO x\n" alone gets it at once).
            buffered = self._real._buffer
            end = buffered.find(b"\r\n")
            if end >= 0:
                del buffered[: end + 2]
            raise BareLineFeed()
        body = line[:-2]
        if _CONTROL.search(body):
            raise BadCommandLine(replies.CONTROL_IN_COMMAND)
        if not body.isascii():
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                raise BadCommandLine(replies.NOT_UTF8_COMMAND) from None
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._real, name, value)


class SMTPEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.recipients: list[Any] = []  # the handler's per-RCPT records, parallel to rcpt_tos
        self.dsn_ret: str | None = None  # RFC 3461 MAIL parameters
        self.dsn_envid: str | None = None
        self.relayed_for_network = False  # a recipient relayed for a client of relay_networks
        self.chunks: ChunkCollector | None = None  # BDAT (RFC 3030) chunks so far
        self.requiretls = False  # MAIL ... REQUIRETLS (RFC 8689)
        self.binarymime = False  # MAIL ... BODY=BINARYMIME (RFC 3030 §3): BDAT only


# The common case of a path: <dot-atom@domain> in ASCII, then parameters.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+\Z")  # RFC 3461 §4: xtext


_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


def valid_orcpt(value: str) -> bool:
    """RFC 3461 §4.2: ``addr-type ";" xtext``, ASCII, at most 500 characters."""
    addr_type, semi, address = value.partition(";")
    return bool(semi and len(value) <= 500 and _ADDR_TYPE.fullmatch(addr_type)
                and _XTEXT.match(address))


class SMTPProtocol(BaseSMTP):
    def __init__(self, handler: Any, *, max_errors: int = 10, **kwargs: Any) -> None:
        kwargs.setdefault("command_call_limit", CALL_LIMITS)
        super().__init__(handler, max_errors=max_errors, **kwargs)

    def _create_envelope(self) -> SMTPEnvelope:
        return SMTPEnvelope()

    def _cb_client_connected(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        super()._cb_client_connected(StrictLineReader(reader), writer)  # type: ignore[arg-type]

    @property
    def tls_active(self) -> bool:
        """STARTTLS done, or an implicit-TLS listener (aiosmtpd only knows the former)."""
        if self._tls_protocol is not None:
            return True
        return self.transport is not None and \
            self.transport.get_extra_info("ssl_object") is not None

    def tls_description(self) -> str:
        if self.transport is None:
            return ""
        obj = self.transport.get_extra_info("ssl_object")
        if obj is None:
            return ""
        return f"using {obj.version()} with cipher {obj.cipher()[0]}"

    async def push(self, status: str | bytes) -> None:
        await super().push(status)
        if (isinstance(status, str) and replies.code_of(status) >= 500
                and status != replies.AIOSMTPD_BOGUS_LIMIT):
            self.errors += 1
            if self.max_errors and self.errors >= self.max_errors:
                log.info("%s: too many errors, closing", self.peer_ip)
                self.say_and_close(replies.TOO_MANY_ERRORS)

    def _set_post_data_state(self) -> None:
        self._drop_chunks()
        super()._set_post_data_state()

    def connection_lost(self, error: Exception | None) -> None:
        self._drop_chunks()
        super().connection_lost(error)

    def _drop_chunks(self) -> None:
        envelope = self.envelope
        if isinstance(envelope, SMTPEnvelope) and envelope.chunks is not None:
            envelope.chunks.discard()  # a spilled file of a transaction that ends undelivered
            envelope.chunks = None

    # -- commands aiosmtpd lacks or gets wrong ------------------------------------------------

    @syntax("BDAT <size> [LAST]")
    async def smtp_BDAT(self, arg: str | None) -> None:
        """RFC 3030 CHUNKING. Each chunk is read whatever the reply (it is data, not
        commands); the message is checked as after DATA and committed only at LAST. An error
        ends the transaction: a later BDAT LAST finds no transaction and delivers nothing."""
        parsed = await self.bdat_arguments(arg)
        if parsed is None:
            return
        size, last = parsed
        envelope = self.envelope
        assert isinstance(envelope, SMTPEnvelope) and self.session is not None
        if not self.session.host_name:
            refusal: str | None = replies.NEED_EHLO
        elif self._auth_required and not self.session.authenticated:
            refusal = replies.AUTH_REQUIRED
        elif not envelope.rcpt_tos:
            refusal = replies.NEED_MAIL_AND_RCPT
        else:
            refusal = None
            if envelope.chunks is None:
                envelope.chunks = ChunkCollector(self.data_size_limit or None,
                                                 sink_factory=self.handler.data_sink,
                                                 binary=envelope.binarymime)
        chunks = envelope.chunks if refusal is None else None
        await self.read_chunk(size, chunks.feed if chunks is not None else None)
        if refusal is not None:
            await self.push(refusal)
            return
        assert chunks is not None
        if chunks.error is None and not last:
            await self.push(replies.CHUNK_RECEIVED.format(size=size))
            return
        result = chunks.finish() if chunks.error is None else chunks.result()
        if result.error is not None:
            log.info("%s: BDAT refused (%s, %d octets)", self.peer_ip, result.error, result.size)
            self._set_post_data_state()
            await self.push(DATA_ERRORS[result.error])
            return
        envelope.chunks = None  # its file (if any) is the handler's to copy, then ours to drop
        await self.deliver_message(result)

    async def smtp_DATA(self, arg: str) -> None:
        envelope = self.envelope
        if isinstance(envelope, SMTPEnvelope) and envelope.chunks is not None:
            await self.push(replies.DATA_AFTER_BDAT)  # RFC 3030 §2: not in one transaction
            return
        if isinstance(envelope, SMTPEnvelope) and envelope.binarymime:
            await self.push(replies.BINARYMIME_NEEDS_BDAT)
            return
        await super().smtp_DATA(arg)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.tls_active:
            await self.push(replies.ALREADY_TLS)  # RFC 3207 §4: only once per session
            return
        await super().smtp_STARTTLS(arg)

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if not self.handler.offers_auth:
            await self.push(replies.NO_AUTH_HERE)
            return
        await super().smtp_AUTH(arg)

    @syntax("EXPN <list>")
    async def smtp_EXPN(self, arg: str) -> None:
        if not arg:
            await self.push(replies.EXPN_SYNTAX)
            return
        status = await self._call_handler_hook("EXPN", arg.strip())
        await self.push(replies.EXPN_DISABLED if status is MISSING else status)

    @property
    def etrn_offered(self) -> bool:
        return bool(self.handler.offers_etrn)

    @syntax("ETRN [@]<domain>", when="etrn_offered")
    async def smtp_ETRN(self, arg: str) -> None:
        """RFC 1985: start delivery of a relay domain's queued mail; the handler decides."""
        if not self.handler.offers_etrn:
            await self.push(replies.NOT_IMPLEMENTED)
            return
        if not arg or not arg.strip():
            await self.push(replies.ETRN_SYNTAX)
            return
        status = await self._call_handler_hook("ETRN", arg.strip())
        await self.push(replies.NOT_IMPLEMENTED if status is MISSING else status)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        """RFC 5321 §4.1.1.8: answered before AUTH too (aiosmtpd refuses it while AUTH is
        required)."""
        required, self._auth_required = self._auth_required, False
        try:
            await super().smtp_HELP(arg)
        finally:
            self._auth_required = required

    async def smtp_SEND(self, arg: str) -> None:
        await self.push(replies.NOT_IMPLEMENTED)  # RFC 5321 §4.1.1: obsolete; not "unknown"

    smtp_SOML = smtp_SAML = smtp_SEND

    async def smtp_TURN(self, arg: str) -> None:
        await self.push(replies.NOT_IMPLEMENTED)  # RFC 5321 §4.1.1: TURN is obsolete, unsafe

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        """aiosmtpd's MAIL, plus the DSN parameters RET and ENVID (RFC 3461 §4.3, §4.4),
        REQUIRETLS (RFC 8689) and BODY=BINARYMIME (RFC 3030).

        They are taken out of the line before aiosmtpd sees it (it refuses unknown parameters
        and upper-cases values, which would change ENVID).
        """
        envelope = self.envelope
        assert isinstance(envelope, SMTPEnvelope)  # _create_envelope makes no other kind
        if arg and not envelope.mail_from:
            kept, ret, envid, requiretls, binary = [], None, None, False, False
            for i, word in enumerate(arg.split(" ")):
                key, eq, value = word.partition("=")
                if i and eq and key.upper() == "RET":
                    ret = value.upper()
                    if ret not in ("FULL", "HDRS"):
                        await self.push(replies.BAD_RET)
                        return
                elif i and not eq and key.upper() == "REQUIRETLS":
                    if not self.tls_active:
                        await self.push(replies.REQUIRETLS_WITHOUT_TLS)
                        return
                    requiretls = True
                elif i and eq and key.upper() == "BODY" and value.upper() == "BINARYMIME":
                    binary = True
                elif i and eq and key.upper() == "ENVID":
                    envid = value
                    if not _XTEXT.match(value) or len(value) > 100:
                        await self.push(replies.BAD_ENVID)
                        return
                else:
                    kept.append(word)
            envelope.dsn_ret, envelope.dsn_envid = ret, envid
            envelope.requiretls = requiretls
            envelope.binarymime = binary
            arg = " ".join(kept)
        await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("RCPT"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.mail_from:
            await self.push(replies.NEED_MAIL)
            return
        syntaxerr = replies.RCPT_SYNTAX
        raw = self._strip_command_keyword("TO:", arg or "")
        if raw is None or not raw:
            await self.push(syntaxerr)
            return
        address, rest = self._getaddr(raw)
        if address is None or not address:
            await self.push(replies.MALFORMED_PATH.format(raw=raw[:100]))
            return
        assert rest is not None
        if rest and not self.session.extended_smtp:
            await self.push(syntaxerr)
            return
        params: dict[str, str] = {}
        for p in rest.split():
            key, eq, value = p.partition("=")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", key) or (eq and not value):
                await self.push(syntaxerr)
                return
            params[key.upper()] = value
        unknown = set(params) - {"NOTIFY", "ORCPT"}
        if unknown:
            await self.push(replies.RCPT_PARAMETER.format(name=sorted(unknown)[0]))
            return
        if "ORCPT" in params and not valid_orcpt(params["ORCPT"]):
            await self.push(replies.BAD_ORCPT)
            return
        status = await self._call_handler_hook("RCPT", address, raw, params)
        await self.push(status)
