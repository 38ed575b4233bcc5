"""Pure policy decisions of the MTA/MSA, tested without sockets.

- ``routing_trick``: the classic ways to make a server relay (percent hack, bang paths, source
  routes, quoted local parts hiding '@', address literals);
- ``received_header``: the RFC 5321 §4.4 trace field with RFC 3848/6531 protocol names;
- ``count_received``: trace fields in the header section, for loop detection (§6.3);
- ``retry_delay``: the backoff schedule.
"""

from __future__ import annotations

import random
import re
import time
from datetime import UTC, datetime
from email.utils import format_datetime
from functools import lru_cache

MAX_RECEIVED = 50  # more trace fields than this means a loop (RFC 5321 §6.3 suggests 100)

_SOURCE_ROUTE = re.compile(r"^\s*<\s*@")


def routing_trick(raw_arg: str, address: str) -> str | None:
    """Why ``address`` (as parsed from ``raw_arg``) is a relay trick, or None."""
    if _SOURCE_ROUTE.match(raw_arg):
        return "source route"
    local, _, domain = address.rpartition("@")
    if local.startswith('"'):
        return "quoted local part"
    if "%" in local:
        return "percent hack"
    if "!" in local:
        return "bang path"
    if domain.startswith("["):
        return "address literal"
    if "@" in local:
        return "'@' in local part"
    return None


def protocol_name(esmtp: bool, tls: bool, auth: bool, utf8: bool) -> str:
    """WITH protocol type: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA (RFC 3848), UTF8 variants (6531)."""
    if not esmtp:
        return "SMTP"
    name = "ESMTP" + ("S" if tls else "") + ("A" if auth else "")
    return ("UTF8SMTP" + name[5:]) if utf8 else name


def received_header(*, helo: str, ip: str, hostname: str, protocol: str, qid: str,
                    tls_info: str = "", when: datetime | None = None) -> bytes:
    """The trace field we prepend. It names no recipient: that would leak Bcc addresses."""
    helo = re.sub(r"[^\x21-\x7e]", "?", helo)[:255] or "unknown"
    stamp = format_datetime(when) if when else _now_stamp()
    tls = f"\r\n\t({tls_info})" if tls_info else ""
    return (f"Received: from {helo} ([{ip}])\r\n\tby {hostname} (pochta) with {protocol}"
            f" id {qid}{tls};\r\n\t{stamp}\r\n").encode()


def _now_stamp() -> str:
    return _stamp(int(time.time()))


@lru_cache(maxsize=2)
def _stamp(second: int) -> str:
    """RFC 5322 date of one second; formatting it per message showed up in profiles."""
    return format_datetime(datetime.fromtimestamp(second, UTC))


def header_section(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


_TLS_REQUIRED_NO = re.compile(rb"^TLS-Required[ \t]*:[ \t]*No[ \t]*\r?$", re.I | re.M)


def tls_optional(message: bytes) -> bool:
    """RFC 8689 §5: the sender's ``TLS-Required: No``, asking that the recipient domain's TLS
    policies not stop the message (a header field of the message's header section)."""
    end = message.find(b"\r\n\r\n")
    return _TLS_REQUIRED_NO.search(message, 0, end if end >= 0 else len(message)) is not None


_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")


def header_fields(head: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each field of a header section.

    A name may be followed by white space before its colon (``From : x``, RFC 5322 §4.5.3's
    obsolete syntax, which mail readers still display as a From): it counts as that field.
    Bytes that are not UTF-8 are replaced; UTF-8 (RFC 6532) is kept.
    """
    fields: list[tuple[str, str]] = []
    for line in head.decode("utf-8", "replace").split("\r\n"):
        if line[:1] in (" ", "\t"):
            if fields:
                fields[-1] = (fields[-1][0], fields[-1][1] + line)
            continue
        name, colon, value = line.partition(":")
        name = name.rstrip(" \t")
        if colon and _FIELD_NAME.fullmatch(name):
            fields.append((name.lower(), value))
    return fields


def count_received(message: bytes) -> int:
    return sum(name == "received" for name, _ in header_fields(header_section(message)))


def retry_delay(attempts: int, initial: float, maximum: float, rng: random.Random | None = None
                ) -> float:
    """Delay before attempt ``attempts + 1``: initial, doubling to maximum, plus 0-10% jitter."""
    base = min(maximum, initial * (2 ** max(0, attempts - 1)))
    return base * (1 + 0.1 * (rng or random).random())
