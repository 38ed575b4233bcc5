"""Delivery through a user's active Sieve script: the script decides (sieve/), this carries
it out for one recipient and answers that recipient's LMTP reply.

Order, so that a 250 means every part is durable: copies into folders first, then redirects
and the vacation reply queued through the runner (mta/outbox.py). What cannot be done falls
back to keeping the message in the INBOX, never to losing it: a script that does not compile
or fails at run time (RFC 5228 §2.10.6), a folder that cannot be made, a redirect the queue
does not take or that would loop. ``reject``/``ereject`` answer 550 for the recipient; the
MTA returns the message with that text in a DSN (never to ``<>``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from mda import vacation
from mda.deliver import Deliverer, FolderUnavailable, Job
from mta import outbox
from mta.forwarding import loops
from mta.smtp import replies
from sieve import (
    INBOX,
    Context,
    Limits,
    Node,
    Outcome,
    SieveError,
    SieveRuntimeError,
    compile_script,
    evaluate,
)
from sieve.interpreter import normalize_folder
from store import addresses, metrics
from store.directory import Directory, DirectoryUnavailable
from store.sieve import SieveStore

log = logging.getLogger("pochta.sieve")

Send = Callable[[outbox.Outgoing], str]
VACATION_KEPT = 31 * 86400.0  # longer than the longest :days (30): older state means nothing


class SieveDelivery:
    def __init__(self, deliverer: Deliverer, store: SieveStore, directory: Directory,
                 spool_dir: str | Path, hostname: str, limits: Limits | None = None,
                 clock: Callable[[], float] = time.time, junk_folder: str = "") -> None:
        # The default rule before any user's script (rspamd on): what the MTA marked
        # X-Spam-Flag: YES goes into this folder. "": off.
        self.junk_folder = junk_folder
        self.deliverer = deliverer
        self.store = store
        self.directory = directory  # who owns a vacation :from address
        self.hostname = hostname
        self.limits = limits or Limits()
        self.clock = clock
        self.send: Send = lambda out: outbox.send(spool_dir, out)
        self.compiled: OrderedDict[str, tuple[list[Node], set[str]] | str] = OrderedDict()
        self.next_cleanup = 0.0  # when vacation state older than any period is next removed

    def applies(self, job: Job) -> bool:
        """Whether ``job`` goes through here (a script, or the Junk rule), not the fast path."""
        return job.mailbox.sieve is not None or (bool(self.junk_folder) and is_spam(job.data))

    async def deliver(self, job: Job) -> str:
        return await asyncio.to_thread(self.deliver_blocking, job)

    def _compiled(self, text: str) -> tuple[list[Node], set[str]] | str:
        digest = hashlib.sha256(text.encode()).hexdigest()
        hit = self.compiled.get(digest)
        if hit is None:
            try:
                hit = compile_script(text)
            except SieveError as e:
                hit = str(e)
            self.compiled[digest] = hit
            while len(self.compiled) > 1000:
                self.compiled.popitem(last=False)
        return hit

    def outcome(self, job: Job, ctx: Context) -> Outcome:
        """What the script decides; keep in the INBOX when it cannot decide."""
        if self.junk_folder and is_spam(job.data):
            log.info("to=<%s> marked as spam: into %s", job.rcpt, self.junk_folder)
            return Outcome(folders={normalize_folder(self.junk_folder): []})
        if job.mailbox.sieve is None:
            return _keep()
        compiled = self._compiled(job.mailbox.sieve)
        if isinstance(compiled, str):
            log.error("to=<%s> the active Sieve script does not compile (%s): kept in INBOX",
                      job.rcpt, compiled)
            return _keep()
        nodes, required = compiled
        try:
            return evaluate(nodes, required, ctx, self.limits)
        except SieveRuntimeError as e:
            log.error("to=<%s> Sieve error (%s): kept in INBOX", job.rcpt, e)
            return _keep()
        except Exception:  # a bug of ours must not lose the message either
            log.exception("to=<%s> Sieve failed: kept in INBOX", job.rcpt)
            return _keep()

    def deliver_blocking(self, job: Job) -> str:
        sender = "" if job.mail_from in ("", "<>") else job.mail_from
        ctx = Context(job.data, sender, job.rcpt)  # the header section parsed once, if at all
        outcome = self.outcome(job, ctx)
        if outcome.reject is not None:
            text = _one_line(outcome.reject) or "rejected by the recipient's filter"
            log.info("to=<%s> status=bounced (Sieve %s: %s)", job.rcpt,
                     "ereject" if outcome.ereject else "reject", text)
            metrics.MAILBOX_WRITES.labels("rejected").inc()
            return replies.SIEVE_REJECTED.format(addr=job.rcpt, text=text)
        folders = dict(outcome.folders)
        if outcome.redirects:
            self._redirect(job, sender, outcome.redirects, folders)
        if outcome.vacation is not None:
            self._vacation(job, ctx, outcome)
        if not folders:
            log.info("to=<%s> status=sent (%s by Sieve)", job.rcpt,
                     "discarded" if outcome.discarded else "redirected")
            return replies.DELIVERED.format(addr=job.rcpt)
        answer = ""
        for folder, flags in folders.items():
            try:
                reply = self.deliverer.deliver_to(job, folder, flags)
            except FolderUnavailable as e:
                log.error("to=<%s> folder %r unavailable (%s): kept in INBOX", job.rcpt,
                          folder, e)
                if INBOX in folders:
                    continue  # stored there anyway, once
                reply = self.deliverer.deliver_to(job, INBOX, flags)
            if not reply.startswith("2"):
                return reply  # the MTA tries again (XRETRY): copies made are found then
            answer = answer or reply
        return answer

    def _redirect(self, job: Job, sender: str, targets: list[str],
                  folders: dict[str, list[str]]) -> None:
        header = job.data.split(b"\n\n", 1)[0]
        looping = loops(header, job.rcpt)
        for target in targets:
            if looping:
                log.warning("to=<%s> redirect to <%s> not done (%s): kept in INBOX",
                            job.rcpt, target, looping)
                folders.setdefault(INBOX, [])
                continue
            message = (f"Delivered-To: {job.rcpt}\n".encode() + job.data).replace(
                b"\n", b"\r\n")
            out = outbox.Outgoing(mail_from=sender, recipients=[target], message=message,
                                  key=f"{job.key}:redirect:{target}" if job.key else "",
                                  kind="redirect", smtputf8=not message.isascii(),
                                  forwarded_by=addresses.domain_of(job.mailbox.address))
            try:
                qid = self.send(out)
            except outbox.OutboxError as e:
                log.error("to=<%s> redirect to <%s> not queued (%s): kept in INBOX",
                          job.rcpt, target, e)
                folders.setdefault(INBOX, [])
                continue
            log.info("to=<%s> redirected to <%s> as %s", job.rcpt, target, qid)

    def _vacation(self, job: Job, ctx: Context, outcome: Outcome) -> None:
        sender = ctx.envelope_from
        v = outcome.vacation
        assert v is not None
        user = job.mailbox.address
        own = {user.lower(), job.rcpt.lower(), *(a.lower() for a in v.addresses)}
        why = vacation.why_not(ctx.headers, sender, own, own)
        if why:
            log.info("to=<%s> vacation: no reply to <%s> (%s)", job.rcpt, sender, why)
            return
        try:
            now = self.clock()
            if now >= self.next_cleanup:  # at most daily: who was answered over 30 days ago
                self.next_cleanup = now + 86400.0
                self.store.forget_vacations(older_than=now - VACATION_KEPT)
            if not self.store.vacation_due(user, sender, v.handle, v.days * 86400.0, now):
                log.info("to=<%s> vacation: <%s> was answered within %d day(s)", job.rcpt,
                         sender, v.days)
                return
        except DirectoryUnavailable as e:
            log.error("to=<%s> vacation: no reply (database: %s)", job.rcpt, e)
            return
        if v.sender and not self._owns(user, _address_in(v.sender)):
            # A script is the user's words: it may not sign replies as somebody else.
            log.warning("to=<%s> vacation :from %s is not the user's: the reply is from <%s>",
                        job.rcpt, v.sender, user)
            v = dataclasses.replace(v, sender=None)
        message = vacation.reply(v, user, sender, ctx.headers, self.hostname, self.clock())
        domain = addresses.domain_of(v.sender and _address_in(v.sender) or user)
        out = outbox.Outgoing(mail_from="", recipients=[sender], message=message,
                              key=f"{job.key}:vacation" if job.key else "", sign=domain,
                              kind="vacation", notify=["NEVER"],
                              smtputf8=not message.isascii())
        try:
            qid = self.send(out)
        except outbox.OutboxError as e:
            log.error("to=<%s> vacation reply to <%s> not queued: %s", job.rcpt, sender, e)
            return
        log.info("to=<%s> vacation reply to <%s> queued as %s", job.rcpt, sender, qid)


    def _owns(self, user: str, address: str) -> bool:
        try:
            return self.directory.owns(user, address)
        except DirectoryUnavailable:
            return False


_SPAM_FLAG = re.compile(rb"(?im)^X-Spam-Flag:[ \t]*YES[ \t]*$")


def is_spam(message: bytes) -> bool:
    """Whether the header section (LF endings) holds the MTA's ``X-Spam-Flag: YES``."""
    end = message.find(b"\n\n")
    return bool(_SPAM_FLAG.search(message, 0, end if end >= 0 else len(message)))


def _keep() -> Outcome:
    return Outcome(folders={INBOX: []})


def _one_line(text: str) -> str:
    # One line of printable ASCII: it goes into an LMTP reply and from there into a DSN.
    return re.sub(r"\s+", " ", text).strip().encode("ascii", "replace").decode()[:400]


def _address_in(value: str) -> str:
    import email.utils

    return email.utils.parseaddr(value)[1] or value
