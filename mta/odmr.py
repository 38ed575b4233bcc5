"""On-Demand Mail Relay (RFC 2645): the ``[odmr] listen`` session, in the MSA process.

A customer whose host has no fixed address connects, says EHLO, STARTTLS, AUTH (as on the
submission ports, and only under TLS), then ``ATRN domain[,domain]``. The user must be the
ODMR user of each domain (``pochta domain add D --relay --odmr-user USER``; no domains named:
all of the user's). The queue runner, which alone delivers, gets the request and one end of a
socket pair (mta/notice.py); it answers the ATRN on it (250, 453 no mail, 450 refused), and
after a 250 the roles reverse: this session only passes bytes between the customer's TLS
connection and the pair, while the runner speaks SMTP as the client (mta/courier/odmr.py),
recording each recipient's outcome as for any delivery. Either side closing ends both.

The port offers nothing else: no MAIL, no VRFY, no ETRN (502).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from aiosmtpd.smtp import syntax

from mta.notice import NoRunner, send_channel
from mta.smtp import Session, replies
from mta.smtp.protocol import SMTPEnvelope, SMTPProtocol
from mta.submission import SubmissionHandler
from store import addresses
from store.directory import DirectoryUnavailable

log = logging.getLogger("pochta.odmr")

ANSWER_TIMEOUT = 30.0  # seconds for the runner's answer to an ATRN
RELAY_IDLE = 1800.0  # seconds a direction of the reversed session may be silent (runner
# timeouts are at most 10 minutes per command; this only catches a runner that hung)
ATRN_REPLY_MAX = 512


def parse_atrn(arg: str | None) -> list[str] | None:
    """RFC 2645 §4.2: ``ATRN [SP domain *("," domain)]``; [] for none; None if malformed."""
    if not arg or not arg.strip():
        return []
    names = [n.strip() for n in arg.strip().split(",")]
    if not all(names) or len(names) > 100:
        return None
    try:
        return sorted({addresses.normalize_domain(n) for n in names})
    except addresses.AddressError:
        return None


class OdmrHandler(SubmissionHandler):
    """AUTH as on submission; ATRN instead of mail transactions."""

    offers_etrn = False

    async def handle_EHLO(self, server: SMTPProtocol, session: Session, envelope: SMTPEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        kept = [r for r in responses[:-1] if r[4:].split(" ")[0].upper() in ("STARTTLS", "AUTH")]
        return [responses[0], *kept, "250-ENHANCEDSTATUSCODES", "250 ATRN"]

    async def atrn_refusal(self, login: str, domains: list[str]) -> tuple[str | None, list[str]]:
        """Whether ``login`` may take ``domains`` (all of its own when empty): a refusal,
        else None and the domains."""
        try:
            own = await asyncio.to_thread(self.directory.odmr_domains, login)
        except DirectoryUnavailable:
            return replies.ATRN_UNABLE, []
        if not domains:
            return (None, own) if own else (replies.ATRN_NO_DOMAINS, [])
        foreign = [d for d in domains if d not in own]
        if foreign:
            return replies.ATRN_NOT_YOURS.format(domain=foreign[0]), []
        return None, domains


class OdmrProtocol(SMTPProtocol):
    @property
    def odmr_handler(self) -> OdmrHandler:
        handler = self.event_handler
        assert isinstance(handler, OdmrHandler)
        return handler

    @syntax("ATRN [domain[,domain]]")
    async def smtp_ATRN(self, arg: str | None) -> None:
        assert self.session is not None
        if not self.session.host_name:
            await self.push(replies.NEED_EHLO)
            return
        if not self.session.authenticated:
            await self.push(replies.AUTH_REQUIRED)
            return
        domains = parse_atrn(arg)
        if domains is None:
            await self.push(replies.ATRN_SYNTAX)
            return
        login = str(self.session.login_data)
        refusal, domains = await self.odmr_handler.atrn_refusal(login, domains)
        if refusal is not None:
            log.info("%s: ATRN %s by %s refused: %s", self.peer_ip, arg or "", login, refusal)
            await self.push(refusal)
            return
        ours, theirs = socket.socketpair()
        try:
            ours.setblocking(False)
            try:
                await asyncio.to_thread(
                    send_channel, self.odmr_handler.spool.dir,
                    f"!atrn {login} {self.peer_ip or '-'} {','.join(domains)}", theirs)
            except (NoRunner, OSError) as e:
                log.warning("%s: ATRN by %s: %s", self.peer_ip, login, e)
                await self.push(replies.ATRN_UNABLE)
                return
            finally:
                theirs.close()
            reader, writer = await asyncio.open_connection(sock=ours)
        except BaseException:
            ours.close()
            raise
        try:
            try:
                answer = await asyncio.wait_for(reader.readuntil(b"\r\n"), ANSWER_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    OSError):
                answer = b""
            line = answer[:-2].decode("ascii", "replace")
            if replies.code_of(line) not in (250, 450, 453) or len(line) > ATRN_REPLY_MAX:
                log.warning("%s: ATRN by %s: the queue runner did not answer", self.peer_ip,
                            login)
                line = replies.ATRN_UNABLE
            await self.push(line)
            self._flush_held()  # even if the customer spoke first: before any relayed byte
            if replies.code_of(line) == 250:
                log.info("%s: ATRN by %s for %s: connection reversed", self.peer_ip, login,
                         ",".join(domains))
                await self._relay(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Pass bytes both ways until the runner is done (or either side goes), then close
        the customer's connection: this session ends with the reversed one."""
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()  # a 421 now would land inside the reversed session
        client_reader, client_writer = self._reader, self._writer

        async def upstream() -> None:  # the customer's replies to the runner
            while data := await asyncio.wait_for(client_reader.read(65536), RELAY_IDLE):
                writer.write(data)
                await writer.drain()
            with contextlib.suppress(OSError):
                writer.write_eof()

        async def downstream() -> None:  # the runner's commands to the customer
            while data := await asyncio.wait_for(reader.read(65536), RELAY_IDLE):
                client_writer.write(data)
                await client_writer.drain()

        up = asyncio.create_task(upstream())
        down = asyncio.create_task(downstream())
        try:
            # The runner closes when it is done; a customer that goes away makes it fail
            # and close too. Its timeouts bound the wait.
            await asyncio.wait([down], timeout=None)
            if not up.done():
                await asyncio.wait([up], timeout=5.0)
        except Exception as e:  # reset, timeout: the end of the reversed session either way
            log.info("%s: reversed session ended: %r", self.peer_ip, e)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            self._close_transport()

    # -- the rest is not offered on this port ---------------------------------------------------

    async def _not_here(self, arg: str | None) -> None:
        await self.push(replies.NOT_ON_ODMR)

    smtp_MAIL = smtp_RCPT = smtp_DATA = smtp_BDAT = _not_here
    smtp_VRFY = smtp_EXPN = smtp_ETRN = _not_here
