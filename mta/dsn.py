"""Delivery status notifications (RFC 3464 in an RFC 6522 multipart/report).

``build_dsn`` is pure: the envelope, the recipients to report and the original message in, the
bounce's bytes out. ``Bouncer`` spools it from ``<>`` to the original sender, never to ``<>``
itself (RFC 5321 §4.5.5: no bounce loops), and only for recipients whose NOTIFY asks for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate

from mta.envelope import EXPIRED, Envelope, Recipient
from mta.reply import LOCAL_DECISION, ascii_text, one_line, utf8_prefix
from mta.spool import Spool, SpooledMessage
from store import addresses
from store.directory import Directory

log = logging.getLogger("pochta.dsn")

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


def status_of(rcpt: Recipient) -> str:
    """The RFC 3463 status for a recipient's outcome, from its last reply where it says one."""
    if rcpt.status == EXPIRED:
        return "4.4.7"  # delivery time expired
    code, _, text = rcpt.last_reply.partition(" ")
    m = _ENHANCED.match(text)
    if m:
        return m.group(0)
    return "5.0.0" if code.startswith("5") else "4.0.0"


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
    "relayed": "Successful Mail Delivery Report",
}
EXPLAIN = {
    "failed": "could not be delivered",
    "delayed": "has not been delivered yet; the mail system keeps trying",
    "delivered": "was delivered",
    "relayed": "was relayed to a system that sends no delivery reports",
}


def expanded(r: Recipient) -> bool:
    """Reached through an alias (or a catch-all), not as the address the sender gave."""
    return addresses.strip_subaddress(r.original) != addresses.strip_subaddress(r.address)


def _address_field(address: str) -> str:
    """An address as a DSN field value: rfc822, or RFC 6533's utf-8 type with escapes."""
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {ascii_text(address)}"


def recipient_fields(r: Recipient, action: str, now: float) -> list[str]:
    """The per-recipient block (RFC 3464 §2.3). An alias's members stay private: the sender
    hears of the address it gave (RFC 3461 §6.2.7.3), so NOTIFY=SUCCESS is no EXPN."""
    fields = []
    if r.orcpt:
        fields.append(f"Original-Recipient: {ascii_text(r.orcpt)}")
    if expanded(r):
        final = r.original
        if action in ("delivered", "relayed"):
            action = "expanded"
    else:
        final = r.address
        if not r.orcpt and r.original != r.address:
            fields.append(f"Original-Recipient: {_address_field(r.original)}")
    status = status_of(r) if action in ("failed", "delayed") else "2.0.0"
    fields += [f"Final-Recipient: {_address_field(final)}", f"Action: {action}",
               f"Status: {status}"]
    if r.last_relay and r.last_relay not in ("mda", "dns", LOCAL_DECISION) and not expanded(r):
        fields.append(f"Remote-MTA: dns; {ascii_text(r.last_relay.split('[')[0])}")
    if r.last_reply:
        fields.append(f"Diagnostic-Code: smtp; {ascii_text(r.last_reply)}")
    fields.append(f"Last-Attempt-Date: {_date(now)}")
    return fields


def build_dsn(env: Envelope, reports: list[tuple[Recipient, str]], original: bytes,
              hostname: str, now: float | None = None, headers_only: bool = False) -> bytes:
    """A multipart/report for ``reports``: (recipient, action) with action one of
    failed, delayed, delivered, relayed (RFC 3464 §2.3.3)."""
    now = time.time() if now is None else now
    boundary = f"{env.id}.{secrets.token_hex(8)}/{hostname}"
    actions = {a for _, a in reports}
    main = "failed" if "failed" in actions else "delayed" if "delayed" in actions else \
        next(iter(actions))
    # Success reports return headers only; so does RET=HDRS (RFC 3461 §4.3).
    # A REQUIRETLS message's content never goes back in a report: the report itself is not
    # sent with REQUIRETLS's guarantees (RFC 8689 §5 leaves that to us). A BINARYMIME
    # message's body is no text a report could carry (RFC 3030 §3, RFC 3462 §4).
    headers_only = headers_only or (env.dsn or {}).get("ret") == "HDRS" or \
        main in ("delivered", "relayed") or env.requiretls or env.body == "BINARYMIME"
    human = [f"This is the mail system at {hostname}.", ""]
    for action in ("failed", "delayed", "delivered", "relayed"):
        group = [r for r, a in reports if a == action]
        if not group:
            continue
        human += [f"Your message {EXPLAIN[action]} for these recipients:", ""]
        for r in group:
            why = "it stayed undeliverable too long" if r.status == EXPIRED else \
                utf8_prefix(one_line(r.last_reply))
            human.append(f"<{r.original}>: {why}" if why else f"<{r.original}>")
        human.append("")
    per_message = [f"Reporting-MTA: dns; {hostname}", f"X-Pochta-Queue-ID: {env.id}",
                   f"Arrival-Date: {_date(env.created)}"]
    envid = (env.dsn or {}).get("envid")
    if envid:
        per_message.insert(0, f"Original-Envelope-Id: {envid}")
    blocks = ["\r\n".join(per_message)]
    for r, action in reports:
        blocks.append("\r\n".join(recipient_fields(r, action, now)))
    if headers_only:
        end = original.find(b"\r\n\r\n")
        returned = original if end < 0 else original[: end + 2]
        returned_type = "text/rfc822-headers"
    else:
        returned, returned_type = original, "message/rfc822"
    if not returned.endswith(b"\r\n"):
        returned += b"\r\n"
    head = "\r\n".join([
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{env.mail_from}>",
        f"Subject: {SUBJECTS[main]}",
        f"Date: {formatdate(now, localtime=False, usegmt=True)}",
        f"Message-ID: <{env.id}.{secrets.token_hex(4)}.dsn@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "", "This is a MIME-encapsulated delivery status notification.", ""])
    parts = [
        head.encode(),
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: 8bit\r\nContent-Description: Notification\r\n\r\n"
        .encode() + "\r\n".join(human).encode() + b"\r\n",
        f"--{boundary}\r\nContent-Type: message/delivery-status\r\n"
        f"Content-Description: Delivery report\r\n\r\n".encode()
        + "\r\n\r\n".join(blocks).encode() + b"\r\n\r\n",
        f"--{boundary}\r\nContent-Type: {returned_type}\r\n"
        f"Content-Description: Undelivered message\r\n\r\n".encode() + returned,
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)


def wants(r: Recipient, kind: str) -> bool:
    """RFC 3461 §4.1: without NOTIFY, failures and delays are reported, successes not."""
    if r.notify is None:
        return kind in ("FAILURE", "DELAY")
    return kind in r.notify


def final_reports(env: Envelope) -> list[tuple[Recipient, str]]:
    """What the sender hears about once every recipient is final."""
    out: list[tuple[Recipient, str]] = []
    expanded_reported: set[str] = set()
    for r in env.recipients:
        if r.status in ("failed", EXPIRED) and wants(r, "FAILURE"):
            out.append((r, "failed"))
        elif r.status == "sent" and wants(r, "SUCCESS") and not r.dsn_passed:
            if expanded(r):  # one "expanded" report for the alias, whatever its members
                if r.original in expanded_reported:
                    continue
                expanded_reported.add(r.original)
            out.append((r, "delivered" if r.last_relay == "mda" else "relayed"))
    return out


def report_id(queue_id: str, reports: list[tuple[Recipient, str]]) -> str:
    """A queue id for the report on ``reports`` about message ``queue_id``: the message's
    time part (the report sorts next to it) and a digest of what is reported."""
    what = ";".join(sorted(f"{r.address}:{r.original}:{action}" for r, action in reports))
    digest = hashlib.blake2s(f"{queue_id}|{what}".encode(), digest_size=3).hexdigest()
    return f"{queue_id[:14]}{digest}"


class Bouncer:
    def __init__(self, hostname: str, spool: Spool, directory: Directory,
                 enqueue: Callable[..., None] | None = None) -> None:
        self.hostname = hostname
        self.spool = spool
        self.directory = directory
        self.enqueue = enqueue

    async def bounce(self, env: Envelope, original: bytes | SpooledMessage,
                     maybe_sent: bool = False) -> None:
        """The DSN due when every recipient is final (failures; successes if asked)."""
        await self.notify(env, original, final_reports(env), maybe_sent)

    async def notify(self, env: Envelope, original: bytes | SpooledMessage,
                     reports: list[tuple[Recipient, str]], maybe_sent: bool = False) -> None:
        """Spool the report on ``reports`` to ``env``'s sender.

        The report's queue id is made from the message's and what it reports: the same report
        made again (the message came back after a crash that followed the report) has the same
        id, is not spooled twice while the first is queued, and with ``maybe_sent`` (the
        message was found in the spool, not announced) the MDA is asked to look for the copy
        it may have made already (XRETRY): the sender hears once."""
        if not reports:
            return
        if not env.mail_from:
            log.info("%s: no DSN for %d recipient(s): the sender is <>", env.id, len(reports))
            return
        headers_only = isinstance(original, SpooledMessage)  # large: its header section only
        if isinstance(original, SpooledMessage):
            original = await asyncio.to_thread(original.header_section) + b"\r\n"
        data = build_dsn(env, reports, original, self.hostname, headers_only=headers_only)
        sender_domain = addresses.domain_of(env.mail_from)
        if await asyncio.to_thread(self.directory.is_local_domain, sender_domain):
            targets = await asyncio.to_thread(self.directory.resolve, env.mail_from)
        else:
            targets = [env.mail_from]
        if not targets:
            log.warning("%s: bounce recipient <%s> does not exist; dropped", env.id, env.mail_from)
            return
        now = time.time()
        dsn = Envelope(id=report_id(env.id, reports), created=now, mail_from="", size=len(data),
                       recipients=[Recipient(address=t, original=env.mail_from, next_attempt=now,
                                             notify=["NEVER"]) for t in targets],
                       body="8BITMIME", smtputf8=not env.mail_from.isascii(),
                       client={"protocol": "local", "ip": "", "helo": ""},
                       dsn={"ret": None, "envid": None})
        if await asyncio.to_thread(self.spool.committed, dsn.id):
            log.info("%s: sender notification %s already queued", env.id, dsn.id)
            return
        await asyncio.to_thread(self.spool.put, dsn, data)
        log.info("%s: sender notification (%s): %s", env.id,
                 ",".join(sorted({a for _, a in reports})), dsn.id)
        if self.enqueue is not None:
            self.enqueue(dsn, maybe_sent)
