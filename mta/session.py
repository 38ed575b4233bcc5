"""The SMTP session's policy: aiosmtpd handler hooks for the MTA (port 25) and the MSA.

Each hook decides a reply; the protocol layer (``mta/smtp/protocol.py``) does the wire. The same
handler serves both roles, told apart by ``Mode``:

- MTA: accepts mail for our domains only; foreign recipients are a relay attempt (554 5.7.1).
- MSA: requires AUTH (under TLS) before MAIL, then relays anywhere (``mta/submission.py``).

End of DATA: the message is spooled and fsynced (in a thread) and only then answered 250.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy.exc import SQLAlchemyError

from mta import forwarding, policy, spamcheck
from mta.abuse import Greylister, PregreetMemory, RateLimiter, dnsbl_listed, in_networks
from mta.authcheck import InboundChecks, strip_forged_results
from mta.envelope import Envelope, Recipient, new_id
from mta.forwarding import srs_of
from mta.notice import NoRunner, send_command
from mta.smtp import Session, replies
from mta.smtp.protocol import BadCommandLine, SMTPEnvelope, SMTPProtocol
from mta.smtp.server import BaseSMTP, Handler
from mta.spool import MessageParts, Spool, read_header_section
from store import addresses, metrics
from store.config import Config, ListenerLimits
from store.directory import Directory, DirectoryUnavailable, lookup

log = logging.getLogger("pochta.smtpd")


@dataclass(frozen=True)
class Mode:
    name: str  # "mta" or "msa"
    submission: bool
    vrfy: bool
    expn: bool


@dataclass
class RcptRecord:
    original: str  # the address as the client gave it
    targets: list[str]  # what it resolves to (final mailboxes and foreign addresses)
    notify: list[str] | None
    orcpt: str | None


def parse_notify(value: str | None) -> list[str] | None:
    """RFC 3461 §4.1: NEVER alone, or any of SUCCESS, FAILURE, DELAY."""
    if value is None:
        return None
    items = [v.upper() for v in value.split(",")]
    if items == ["NEVER"] or (items and set(items) <= {"SUCCESS", "FAILURE", "DELAY"}):
        return items
    raise ValueError(value)


@dataclass
class Defences:
    """The MTA's inbound checks and abuse defences; all optional (None: off)."""

    checks: InboundChecks | None = None
    greylist: Greylister | None = None
    dnsbl_resolver: Any = None
    pregreet: PregreetMemory | None = None
    connection_rate: RateLimiter | None = None


class SMTPHandler(Handler):
    def __init__(self, cfg: Config, mode: Mode, directory: Directory, spool: Spool,
                 announce: Callable[[str], None],
                 defences: Defences | None = None) -> None:
        self.cfg = cfg
        self.mode = mode
        self.directory = directory
        self.spool = spool
        self.announce = announce
        self.offers_auth = mode.submission
        self.offers_etrn = not mode.submission
        self.defences = defences or Defences()
        self.srs = srs_of(cfg)  # bounces to our SRS addresses go back to the original sender
        self.spam = spamcheck.RspamdClient(cfg.spam.rspamd, cfg.spam.timeout) \
            if cfg.spam.rspamd and (not mode.submission or cfg.spam.check_submission) else None
        self.limits: ListenerLimits = cfg.msa if mode.submission else cfg.mta

    def trusted(self, server: SMTPProtocol, session: Session) -> bool:
        """Authenticated users and our local networks skip the inbound defences."""
        return bool(session.authenticated) or in_networks(server.peer_ip,
                                                         self.cfg.checks.local_networks)

    # -- connection ---------------------------------------------------------------------------

    async def on_connect(self, server: BaseSMTP) -> str | None:
        d, ip = self.defences, server.peer_ip
        if not ip or in_networks(ip, self.cfg.checks.local_networks):
            return None  # as Postfix's mynetworks: our own hosts are not rate limited
        if d.connection_rate is not None and d.connection_rate.hit(ip):
            log.warning("%s: connection rate limit", ip)
            metrics.DEFENCE_HITS.labels("connection_rate").inc()
            return replies.CONNECTION_RATE
        if d.dnsbl_resolver is not None and self.cfg.checks.dnsbl:
            zone = await dnsbl_listed(ip, self.cfg.checks.dnsbl, d.dnsbl_resolver)
            if zone:
                log.warning("%s: listed in %s", ip, zone)
                metrics.DEFENCE_HITS.labels("dnsbl").inc()
                return replies.DNSBL_LISTED.format(ip=ip, zone=zone)
        if d.pregreet is not None and not d.pregreet.known(ip):
            if await server.talks_before_greeting(self.cfg.checks.pregreet_delay):
                log.warning("%s: pregreet: spoke before the greeting", ip)
                metrics.DEFENCE_HITS.labels("pregreet").inc()
                return replies.PREGREET
            d.pregreet.add(ip)
        return None

    # -- greeting -----------------------------------------------------------------------------

    async def handle_EHLO(self, server: SMTPProtocol, session: Session, envelope: SMTPEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        out = [r for r in responses[:-1] if not (r.startswith("250-AUTH") and not self.offers_auth)]
        out += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN", "250-CHUNKING",
                "250-BINARYMIME"]
        if self.offers_etrn:
            out.append("250-ETRN")  # RFC 1985: backup MX clients; the networks are checked
        if server.tls_active:
            out.append("250-REQUIRETLS")  # RFC 8689 §4: offered on TLS sessions only
        return [*out, responses[-1]]

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, BadCommandLine):
            return error.reply
        log.exception("session error: %r", error)
        return replies.LOCAL_ERROR

    async def handle_ETRN(self, server: SMTPProtocol, session: Session, envelope: SMTPEnvelope,
                          node: str) -> str:
        """RFC 1985: release and deliver a relay domain's queued mail now (port 25 only)."""
        if node.startswith("#"):
            return replies.ETRN_NAMED_QUEUE.format(node=node)
        subdomains = node.startswith("@")
        try:
            domain = addresses.normalize_domain(node[1:] if subdomains else node)
        except addresses.AddressError:
            return replies.ETRN_SYNTAX
        if not in_networks(server.peer_ip, self.cfg.mta.etrn_networks):
            log.info("%s: ETRN %s refused: not in etrn_networks", server.peer_ip, node)
            return replies.ETRN_NOT_ALLOWED
        try:
            route = await lookup(self.directory, "relay_route", domain)
        except DirectoryUnavailable:
            return replies.ETRN_UNABLE.format(node=node)
        if route is None:
            return replies.ETRN_NOT_RELAY.format(node=node)
        try:
            await asyncio.to_thread(send_command, self.spool.dir,
                                    f"!flush {'@' if subdomains else ''}{domain}")
        except NoRunner as e:
            log.warning("%s: ETRN %s: %s", server.peer_ip, node, e)
            return replies.ETRN_UNABLE.format(node=node)
        log.info("%s: ETRN %s: queuing started", server.peer_ip, node)
        return replies.ETRN_STARTED.format(node=node)

    # -- transaction --------------------------------------------------------------------------

    async def handle_MAIL(self, server: SMTPProtocol, session: Session, envelope: SMTPEnvelope,
                          address: str, mail_options: list[str]) -> str:
        raw = address
        if raw in ("<>", ""):
            sender = ""
        else:
            if policy.routing_trick("", raw):
                return replies.BAD_SENDER.format(addr=raw, why="routing characters")
            try:
                sender = addresses.normalize(raw)
            except addresses.AddressError as e:
                return replies.BAD_SENDER.format(addr=raw, why=e)
        # Postfix's queue_minfree: refuse early rather than fail after the client sent it all.
        size = next((int(o[5:]) for o in mail_options if o.startswith("SIZE=")
                     and o[5:].isdigit()), 0)
        try:
            free = self.spool.free_bytes()  # one statvfs: cheaper than a thread hop
        except OSError:
            free = 0
        if free < self.cfg.mta.min_free_space + size:
            log.warning("spool nearly full (%d bytes free): refusing MAIL", free)
            return replies.SPOOL_FULL
        envelope.mail_from = sender or "<>"
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK

    async def handle_RCPT(self, server: SMTPProtocol, session: Session, envelope: SMTPEnvelope,
                          address: str, raw: str, params: dict[str, str]) -> str:
        if len(envelope.rcpt_tos) >= self.limits.max_recipients:
            return replies.TOO_MANY_RCPTS
        trick = policy.routing_trick(raw, address)
        if trick:
            log.info("%s: relay attempt (%s) to <%s>", server.peer_ip, trick, address)
            return replies.RELAY_TRICK.format(addr=address)
        try:
            rcpt = addresses.normalize(address)
        except addresses.AddressError as e:
            return replies.BAD_ADDRESS.format(addr=address, why=e)
        try:
            notify = parse_notify(params.get("NOTIFY"))
        except ValueError:
            return replies.BAD_NOTIFY
        try:
            domain = addresses.domain_of(rcpt)
            local = await lookup(self.directory, "is_local_domain", domain)
            relay = None if local else await lookup(self.directory, "relay_route", domain)
            if local and self.srs is not None and forwarding.is_srs(rcpt):
                try:
                    targets = [self.srs.reverse(rcpt)]
                except forwarding.ForgedSrs as e:
                    log.info("%s: forged SRS recipient <%s>: %s", server.peer_ip, rcpt, e)
                    return replies.FORGED_SRS.format(addr=address)
            elif local:
                targets = await lookup(self.directory, "resolve", rcpt)
            elif relay is not None:  # we are its backup MX: its recipients, or the listed ones
                listed = not relay.restricted or await lookup(
                    self.directory, "is_relay_recipient", rcpt)
                targets = [rcpt] if listed else []
            elif session.authenticated:
                targets = [rcpt]
            elif not self.mode.submission and in_networks(server.peer_ip,
                                                          self.cfg.mta.relay_networks):
                log.info("%s: relay for a client of relay_networks to <%s>", server.peer_ip, rcpt)
                targets = [rcpt]
                envelope.relayed_for_network = True
            else:
                log.info("%s: relay denied to <%s>", server.peer_ip, rcpt)
                return replies.RELAY_DENIED.format(addr=address)
        except DirectoryUnavailable as e:
            log.error("directory unavailable at RCPT <%s>: %s", rcpt, e)
            return replies.DIRECTORY_UNAVAILABLE
        if not targets:
            log.info("%s: unknown recipient <%s>", server.peer_ip, rcpt)
            return replies.NO_SUCH_USER.format(addr=address)
        if self.defences.greylist is not None and not self.trusted(server, session):
            sender = "" if envelope.mail_from == "<>" else envelope.mail_from or ""
            try:
                wait = await asyncio.to_thread(self.defences.greylist.check, server.peer_ip,
                                               sender, rcpt)
            except SQLAlchemyError as e:
                log.error("greylist database error: %s", e)
                wait = 0.0  # fail open: greylisting is a filter, not a guarantee
            if wait > 0:
                log.info("%s: greylisted from=<%s> to=<%s>", server.peer_ip, sender, rcpt)
                metrics.DEFENCE_HITS.labels("greylist").inc()
                return replies.GREYLISTED.format(addr=address, wait=wait)
        envelope.rcpt_tos.append(rcpt)
        envelope.recipients.append(RcptRecord(rcpt, targets, notify, params.get("ORCPT")))
        return replies.RCPT_OK

    def data_sink(self) -> tuple[BinaryIO, Path]:
        """Where a large message spills while it arrives: a temporary file in the spool."""
        path = self.spool.dir / f".data-{secrets.token_hex(8)}.tmp"
        return open(path, "xb"), path  # noqa: SIM115 -- closed by the DATA reader

    async def handle_DATA(self, server: SMTPProtocol, session: Session,
                          envelope: SMTPEnvelope) -> str:
        content: Any = envelope.content
        spilled: Path | None = getattr(envelope, "spilled", None)
        body_offset = 0
        if spilled is not None:
            if self.mode.submission:  # the MSA rewrites and signs: it needs the whole message
                content = await asyncio.to_thread(spilled.read_bytes)
                spilled = None
            else:  # the MTA only needs the header section; the body stays on disk
                content = await asyncio.to_thread(read_header_section, spilled)
                body_offset = len(content)
        assert isinstance(content, bytes)
        if policy.count_received(content) > policy.MAX_RECEIVED:
            return replies.MAIL_LOOP
        checked = await self.check_message(session, content)
        if isinstance(checked, str):
            return checked
        # RFC 8601 §5: results claiming to be ours are forged, whoever sends them (a trusted
        # host or a user may forward what a stranger wrote).
        content = strip_forged_results(checked, self.cfg.hostname)
        checks = self.defences.checks
        if checks is not None and not self.trusted(server, session):
            sender = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
            verdict = await asyncio.to_thread(checks.check, server.peer_ip,
                                              session.host_name or "", sender, content,
                                              spilled is None)
            for method in ("spf", "dkim", "dmarc"):
                if method in verdict.results:
                    metrics.AUTH_RESULTS.labels(method, verdict.results[method]).inc()
            if verdict.reply is not None:
                log.info("%s: refused by authentication checks %s: %s", server.peer_ip,
                         verdict.results, verdict.reply)
                return verdict.reply
            content = verdict.header + content
        qid = new_id()
        if self.spam is not None and (not session.authenticated
                                      or self.cfg.spam.check_submission):
            refusal, content = await self.check_spam(qid, server, session, envelope, content,
                                                     spilled, body_offset)
            if refusal is not None:
                return refusal
        protocol = policy.protocol_name(
            esmtp=bool(session.extended_smtp), tls=server.tls_active,
            auth=bool(session.authenticated), utf8=bool(envelope.smtp_utf8))
        trace = policy.received_header(helo=session.host_name or "", ip=server.peer_ip or "local",
                                       hostname=self.cfg.hostname, protocol=protocol, qid=qid,
                                       tls_info=server.tls_description())
        message: bytes | MessageParts = trace + content
        if spilled is not None:
            message = [trace + content, (spilled, body_offset)]
        env = self.spool_envelope(qid, server, session, envelope, protocol)
        env.tls_optional = not env.requiretls and policy.tls_optional(content)
        try:
            await commit_and_announce(self.spool, env, message, self.announce)
        except OSError as e:
            log.error("%s: cannot spool message: %s", qid, e)
            return replies.SPOOL_FULL if e.errno in (errno.ENOSPC, errno.EDQUOT) \
                else replies.SPOOL_ERROR
        except Exception:
            log.exception("%s: cannot spool message", qid)
            return replies.SPOOL_ERROR
        metrics.MESSAGES.labels(server.listener).inc()
        metrics.MESSAGE_BYTES.labels(server.listener).inc(env.size)
        metrics.RECIPIENTS.labels(server.listener).inc(len(env.recipients))
        log.info("%s: from=<%s> size=%d nrcpt=%d client=%s proto=%s%s", qid, env.mail_from,
                 env.size, len(env.recipients), server.peer_ip or "local", protocol,
                 " relay=network" if envelope.relayed_for_network else "")
        return replies.QUEUED.format(id=qid)

    async def check_spam(self, qid: str, server: SMTPProtocol, session: Session,
                         envelope: SMTPEnvelope, content: bytes, spilled: Path | None,
                         body_offset: int) -> tuple[str | None, bytes]:
        """rspamd's verdict (mta/spamcheck.py): a refusal, or the header section with its
        X-Spam-* lines added."""
        assert self.spam is not None
        size = len(content) + (await asyncio.to_thread(os.path.getsize, spilled) - body_offset
                               if spilled else 0)
        if size > spamcheck.MAX_SCAN:
            log.info("%s: not checked for spam (%d bytes)", qid, size)
            return None, content
        whole = content
        if spilled is not None:
            whole = content + await asyncio.to_thread(_read_from, spilled, body_offset)
        sender = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
        login = session.login_data if session.authenticated else ""
        user = login.decode("utf-8", "replace") if isinstance(login, bytes) else str(login or "")
        env = spamcheck.Request(sender, list(envelope.rcpt_tos), server.peer_ip or "",
                                 session.host_name or "", qid, user)
        verdict: spamcheck.Verdict | None = None
        try:
            verdict = await self.spam.check(env, whole)
        except spamcheck.SpamCheckError as e:
            log.warning("%s: spam check failed (%s): %s", qid, e,
                        "accepted unchecked" if self.cfg.spam.fail_open else "deferred")
        decision = spamcheck.decide(verdict, self.cfg.spam.fail_open, self.cfg.hostname)
        metrics.SPAM_CHECKS.labels(decision.result).inc()
        if verdict is not None:
            log.info("%s: rspamd: %s score=%.2f/%.2f", qid, verdict.action, verdict.score,
                     verdict.required)
        if decision.reply is not None:
            log.info("%s: refused by the spam filter from=<%s> client=%s: %s", qid, sender,
                     server.peer_ip, decision.reply)
            return decision.reply, content
        return None, decision.header + content

    async def check_message(self, session: Session, content: bytes) -> bytes | str:
        """Submission's header rules hook in here; the MTA takes messages as they come."""
        return content

    def spool_envelope(self, qid: str, server: SMTPProtocol, session: Session,
                       envelope: SMTPEnvelope, protocol: str) -> Envelope:
        mail_from = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
        opts = {o.split("=", 1)[0]: (o.split("=", 1)[1] if "=" in o else "")
                for o in envelope.mail_options}
        now = time.time()
        recipients = []
        seen: set[str] = set()
        for rec in envelope.recipients:
            for target in rec.targets:
                if target != rec.original and addresses.strip_subaddress(rec.original) == target:
                    target = rec.original  # keep +tag: the MDA shows it in Delivered-To
                if target in seen:
                    continue  # one copy per final address, however many ways it was reached
                seen.add(target)
                recipients.append(Recipient(address=target, original=rec.original,
                                            orcpt=rec.orcpt, notify=rec.notify,
                                            next_attempt=now))
        return Envelope(
            id=qid, created=now, mail_from=mail_from, recipients=recipients,
            smtputf8=bool(envelope.smtp_utf8),
            body="BINARYMIME" if envelope.binarymime else opts.get("BODY", "7BIT") or "7BIT",
            client={"ip": server.peer_ip, "helo": session.host_name, "protocol": protocol,
                    "auth": session.login_data if session.authenticated else None},
            dsn={"ret": envelope.dsn_ret, "envid": envelope.dsn_envid},
            requiretls=envelope.requiretls)

    # -- VRFY / EXPN --------------------------------------------------------------------------

    def _lookups_allowed(self, enabled: bool, session: Session) -> bool:
        # On submission, only authenticated users may look up addresses (as Stalwart does).
        return enabled and (not self.mode.submission or bool(session.authenticated))

    async def handle_VRFY(self, server: SMTPProtocol, session: Session, envelope: SMTPEnvelope,
                          address: str) -> str:
        if not self._lookups_allowed(self.mode.vrfy, session):
            return replies.VRFY_DISABLED
        try:
            found = await asyncio.to_thread(self.directory.vrfy, address)
        except DirectoryUnavailable:
            return replies.DIRECTORY_UNAVAILABLE
        if found is None:
            return replies.VRFY_UNKNOWN.format(addr=address)
        return replies.VRFY_OK.format(addr=found)

    async def handle_EXPN(self, server: SMTPProtocol, session: Session, envelope: SMTPEnvelope,
                          name: str) -> str:
        if not self._lookups_allowed(self.mode.expn, session):
            return replies.EXPN_DISABLED
        address = name.strip("<>")
        try:
            members = await asyncio.to_thread(self.directory.expn, address)
        except DirectoryUnavailable:
            return replies.DIRECTORY_UNAVAILABLE
        if not members:
            return replies.EXPN_UNKNOWN.format(addr=address)
        return "\r\n".join(replies.EXPN_MEMBER.format(sep="-" if i < len(members) - 1 else " ",
                                                      addr=m) for i, m in enumerate(members))


def _read_from(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


async def commit_and_announce(spool: Spool, env: Envelope, message: bytes | MessageParts,
                              announce: Callable[[str], None]) -> None:
    """Commit ``env`` to the spool and tell the queue runner, even if the session that waits
    for it goes away meanwhile (a client that disconnects after the final dot): the commit
    goes on, and a committed message is always announced."""
    commit = asyncio.ensure_future(spool.commit(env, message))

    def committed(done: asyncio.Future[None]) -> None:
        if not done.cancelled() and done.exception() is None:
            announce(env.id)

    commit.add_done_callback(committed)
    await asyncio.shield(commit)
