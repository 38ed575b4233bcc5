"""Messages the MDA makes (a Sieve ``redirect``, a vacation reply) go into the queue through
the queue runner, the spool's one writer for them: the MDA may run as another user, and
only the runner's in-memory queue is authoritative.

The MDA makes a socket pair, passes one end with an ``!outbox`` notice (mta/notice.py) and
writes one JSON line (the envelope) and the message on its end, then shuts it for writing.
The runner spools the message (fsynced), schedules it and answers ``250 <queue id>``, or
``451``/``554`` with why. The MDA answers its LMTP client only after that 250, so a message
it says it redirected is durable. A ``key`` names one action of one delivery: the same key
within the runner's lifetime gets the first message's id, so an LMTP retry is not sent twice.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

from mta.notice import NoRunner, send_channel

MAX_ENVELOPE_LINE = 1 << 16


class OutboxError(Exception):
    """The message could not be queued (no runner, a refusal, a time-out)."""


@dataclass(frozen=True)
class Outgoing:
    mail_from: str  # "" for the null sender
    recipients: list[str]
    message: bytes  # CRLF line endings
    key: str = ""
    sign: str = ""  # DKIM-sign with this domain's key ("" not)
    kind: str = "redirect"  # for the log: redirect, vacation
    smtputf8: bool = False
    notify: list[str] | None = field(default=None)
    # A forward (redirect) by this domain of ours: the runner gives it an SRS sender.
    forwarded_by: str = ""

    def envelope_line(self) -> bytes:
        return json.dumps({"mail_from": self.mail_from, "recipients": self.recipients,
                           "key": self.key, "sign": self.sign, "kind": self.kind,
                           "smtputf8": self.smtputf8, "notify": self.notify,
                           "forwarded_by": self.forwarded_by}).encode() + b"\n"


def send(spool_dir: Path | str, out: Outgoing, timeout: float = 30.0) -> str:
    """Queue ``out`` through the runner (blocking); its queue id, or OutboxError."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        try:
            with theirs:
                send_channel(spool_dir, "!outbox", theirs)
        except NoRunner as e:
            raise OutboxError(str(e)) from None
        ours.settimeout(timeout)
        try:
            ours.sendall(out.envelope_line())
            ours.sendall(out.message)
            ours.shutdown(socket.SHUT_WR)
            reply = b""
            while not reply.endswith(b"\n") and len(reply) < 4096:
                chunk = ours.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except OSError as e:  # a time-out included
            raise OutboxError(f"the queue runner did not take the message: {e}") from None
    text = reply.decode("utf-8", "replace").strip()
    if not text.startswith("250 "):
        raise OutboxError(text or "the queue runner closed without an answer")
    return text[4:]


async def receive(channel: socket.socket, limit: int) -> Outgoing:
    """The runner's end: the envelope line and message (at most ``limit`` bytes)."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    while True:
        chunk = await loop.sock_recv(channel, 1 << 16)
        if not chunk:
            break
        data += chunk
        if len(data) > limit + MAX_ENVELOPE_LINE:
            raise OutboxError("message too large")
    line, sep, message = bytes(data).partition(b"\n")
    if not sep or len(line) > MAX_ENVELOPE_LINE:
        raise OutboxError("no envelope line")
    try:
        raw = json.loads(line)
        out = Outgoing(mail_from=str(raw["mail_from"]),
                       recipients=[str(r) for r in raw["recipients"]], message=message,
                       key=str(raw.get("key", "")), sign=str(raw.get("sign", "")),
                       kind=str(raw.get("kind", "redirect")),
                       smtputf8=bool(raw.get("smtputf8")), notify=raw.get("notify"),
                       forwarded_by=str(raw.get("forwarded_by", "")))
    except (ValueError, KeyError, TypeError) as e:
        raise OutboxError(f"malformed envelope line: {e}") from None
    if not out.recipients or len(out.recipients) > 100 or not message:
        raise OutboxError("no recipients or no message")
    return out
