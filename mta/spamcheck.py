"""Spam filtering with rspamd (``[spam] rspamd``): each message on port 25 is checked at the
end of DATA, before the 250, over rspamd's HTTP protocol (``POST /checkv2`` with the
envelope, HELO and client address as headers, https://rspamd.com/doc/developers/protocol.html).

What rspamd's action means here: ``reject`` -> 550 5.7.1 (refused at the door: never a bounce
after a 250), ``soft reject`` and ``greylist`` -> 451 4.7.1, ``add header`` and ``rewrite
subject`` -> ``X-Spam-*`` headers (the subject is left alone: rewriting it breaks DKIM) and,
by the MDA's default rule, the user's Junk folder. rspamd down, slow or answering nonsense:
the message is accepted with a log line and the ``pochta_spam_checks_total{result="error"}``
count (``fail_open = true``), else 451 4.7.1.

``parse_verdict`` and ``decide`` are pure; ``RspamdClient.check`` is the I/O.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11

from mta.smtp import replies

log = logging.getLogger("pochta.spam")

MAX_SCAN = 20 << 20  # larger messages are not scanned (rspamd's own default limit is 50 MB)
MAX_RESPONSE = 1 << 20
SPAM_ACTIONS = ("add header", "rewrite subject")


class SpamCheckError(Exception):
    """No verdict: rspamd unreachable, slow, or its answer unreadable."""


@dataclass(frozen=True)
class Verdict:
    action: str  # "no action", "add header", "rewrite subject", "soft reject", "greylist", "reject"
    score: float
    required: float
    symbols: list[str] = field(default_factory=list)
    message: str = ""  # rspamd's smtp_message, for the reply


@dataclass(frozen=True)
class Decision:
    reply: str | None  # a refusal, or None: accept
    header: bytes  # X-Spam-* lines to add on top of the message
    result: str  # for the metric: ham, spam, rejected, deferred, error


def parse_verdict(body: bytes) -> Verdict:
    try:
        raw = json.loads(body)
        action = str(raw["action"]).lower()
        score = float(raw.get("score", 0.0))
        required = float(raw.get("required_score", 0.0))
        symbols = sorted(str(s) for s in (raw.get("symbols") or {}))
        messages = raw.get("messages") or {}
        message = str(messages.get("smtp_message", "")) if isinstance(messages, dict) else ""
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SpamCheckError(f"unreadable answer from rspamd: {e!r}") from None
    return Verdict(action, score, required, symbols, message)


def _one_line(text: str) -> str:
    return " ".join(text.split()).encode("ascii", "replace").decode()[:200]


def decide(verdict: Verdict | None, fail_open: bool, hostname: str) -> Decision:
    if verdict is None:
        if fail_open:
            return Decision(None, b"", "error")
        return Decision(replies.SPAM_CHECK_UNAVAILABLE, b"", "error")
    symbols = ",".join(verdict.symbols[:40])
    status = (f"score={verdict.score:.2f} required={verdict.required:.2f} "
              f"action={verdict.action.replace(' ', '_')} symbols={symbols}")
    if verdict.action == "reject":
        why = _one_line(verdict.message) or "message looks like spam"
        return Decision(replies.SPAM_REJECTED.format(why=why), b"", "rejected")
    if verdict.action in ("soft reject", "greylist"):
        return Decision(replies.SPAM_DEFERRED, b"", "deferred")
    spam = verdict.action in SPAM_ACTIONS
    header = (f"X-Spam-Flag: {'YES' if spam else 'NO'}\r\n"
              f"X-Spam-Score: {verdict.score:.2f} / {verdict.required:.2f}\r\n"
              f"X-Spam-Status: {'Yes' if spam else 'No'}, {status}\r\n"
              f"X-Spam-Checker: rspamd on {hostname}\r\n")
    return Decision(None, header.encode(), "spam" if spam else "ham")


@dataclass(frozen=True)
class Request:
    """What rspamd is told besides the message."""

    mail_from: str
    rcpts: list[str]
    ip: str
    helo: str
    queue_id: str
    user: str = ""  # the authenticated login, on submission


class RspamdClient:
    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected http://host:port, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 11333
        self.path = (parts.path.rstrip("/") or "") + "/checkv2"
        self.timeout = timeout

    async def check(self, env: Request, message: bytes) -> Verdict:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._exchange(env, message)
        except TimeoutError:
            raise SpamCheckError(f"rspamd did not answer within {self.timeout:g} s") from None
        except (OSError, h11.ProtocolError) as e:
            raise SpamCheckError(f"rspamd: {e}") from None

    async def _exchange(self, env: Request, message: bytes) -> Verdict:
        headers = [("Host", f"{self.host}:{self.port}"), ("Content-Length", str(len(message))),
                   ("IP", env.ip or "127.0.0.1"), ("Helo", env.helo or "unknown"),
                   ("From", env.mail_from or "<>"), ("Queue-Id", env.queue_id),
                   ("Pass", "all")]  # rspamd's own settings may skip checks otherwise
        headers += [("Rcpt", r) for r in env.rcpts]
        if env.user:
            headers.append(("User", env.user))
        conn = h11.Connection(h11.CLIENT)
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(conn.send(h11.Request(method="POST", target=self.path,
                                               headers=[(k.encode(), _header_value(v))
                                                        for k, v in headers])))
            writer.write(conn.send(h11.Data(data=message)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            status = 0
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_RESPONSE:
                        raise SpamCheckError("rspamd's answer is too large")
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
        finally:
            writer.close()
        if status != 200:
            raise SpamCheckError(f"rspamd answered HTTP {status}")
        return parse_verdict(bytes(body))


def _header_value(value: str) -> bytes:
    # An address with bytes that are not ASCII (SMTPUTF8) still fits in an HTTP header.
    return value.encode("utf-8", "replace").replace(b"\r", b"").replace(b"\n", b"")
