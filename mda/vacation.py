"""Vacation replies (RFC 5230, following RFC 3834): whether a message may be answered, and
the answer. Pure; the MDA (mda/filtering.py) remembers who was answered when (store/sieve.py)
and queues the reply from ``<>`` (mta/outbox.py), DKIM-signed by the queue runner.
"""

from __future__ import annotations

import email.utils
import re
import time
from email.message import EmailMessage, Message
from email.policy import SMTP

from sieve import Vacation

# RFC 3834 §2 / RFC 5230 §4.6: senders that are programs, not people.
_ROBOT = re.compile(r"(?i)^(mailer-daemon|listserv|majordomo|owner-.*|.*-request|"
                    r"postmaster|noreply|no-reply|bounces?(\+.*)?)$")


def why_not(headers: Message, sender: str, own: set[str], recipients_seen: set[str]) -> str:
    """Why no reply goes to ``sender`` ("" if one may): RFC 5230 §4.5 and RFC 3834 §2."""
    if not sender or sender == "<>":
        return "null sender"
    if sender.lower() in own:
        return "a message from the user"
    local = sender.rpartition("@")[0]
    if _ROBOT.match(local):
        return f"sender {sender} is a program"
    auto = str(headers.get("Auto-Submitted", "no")).split(";")[0].strip().lower()
    if auto != "no":
        return f"Auto-Submitted: {auto}"
    if str(headers.get("Precedence", "")).strip().lower() in ("bulk", "list", "junk"):
        return "Precedence: " + str(headers.get("Precedence")).strip()
    if any(name.lower().startswith("list-") for name in headers):
        return "a mailing list message (List-* headers)"
    if headers.get("X-Spam-Flag", "").strip().upper() == "YES":
        return "marked as spam"
    named = {a.lower() for field in ("To", "Cc", "Bcc", "Resent-To", "Resent-Cc")
             for _, a in email.utils.getaddresses([str(v) for v in headers.get_all(field, [])])
             if a}
    if not named & recipients_seen:
        return "the user is not named in To, Cc or Bcc"
    return ""


def reply(v: Vacation, user: str, sender: str, original: Message, hostname: str,
          now: float | None = None) -> bytes:
    """The reply message (CRLF), From the user (or ``:from``) To the original sender."""
    subject = v.subject
    if subject is None:
        old = _unfold(str(original.get("Subject", "")))
        subject = "Auto: " + old if old else "Automated reply"
    msg: Message
    if v.mime:
        # The reason is a MIME entity: its own headers, then its body.
        text = v.reason.replace("\r\n", "\n")
        head, _, body = text.partition("\n\n")
        msg = Message()
        for line in head.splitlines():
            name, sep, value = line.partition(":")
            if sep:
                msg[name.strip()] = value.strip()
        msg.set_payload(body)
        msg["MIME-Version"] = "1.0"
    else:
        em = EmailMessage()
        em.set_content(v.reason.replace("\r\n", "\n"), charset="utf-8")
        msg = em
    msg["From"] = v.sender or user
    msg["To"] = sender
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(now if now is not None else time.time())
    msg["Message-ID"] = email.utils.make_msgid(domain=hostname)
    msg["Auto-Submitted"] = "auto-replied (vacation)"
    original_id = str(original.get("Message-ID", "")).strip()
    if original_id:
        msg["In-Reply-To"] = original_id
        refs = _unfold(str(original.get("References", "")))
        msg["References"] = f"{refs} {original_id}".strip()
    return msg.as_bytes(policy=SMTP)


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n[ \t]+", " ", value).strip()
