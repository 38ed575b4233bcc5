"""A delivery reply (from the MDA, a remote MX, or our own decision) as the queue records it.

Whatever a peer sends, a ``Reply`` holds one line of printable text of bounded length: a
multi-line reply's lines are joined with " / " (aiosmtplib joins them with a bare LF), bytes
that were not UTF-8 become U+FFFD, control characters become spaces. That text goes into the
log (one line per event), the envelope file and the DSN, whose Diagnostic-Code must be a
7-bit header field: ``ascii_text`` gives that form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_TEXT = 500  # characters of a peer's reply kept: enough for any real diagnostic
LOCAL_DECISION = "local"  # relay of a reply we made ourselves about a host (no Remote-MTA)

_LINE_BREAKS = re.compile(r"[ \t]*(?:\r\n|\r|\n)[ \t]*")
_SURROGATES = re.compile("[\ud800-\udfff]")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # after line breaks


def one_line(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` as one printable line of at most ``limit`` characters (see the module)."""
    if text.isascii() and text.isprintable() and len(text) <= limit:
        return text  # the common case: one plain line
    text = _SURROGATES.sub("\ufffd", text)  # bytes that were not UTF-8 (surrogateescape)
    text = _LINE_BREAKS.sub(" / ", text.strip("\r\n"))
    text = _CONTROLS.sub(" ", text.replace("\t", " "))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ascii_text(text: str, limit: int = MAX_TEXT) -> str:
    """One line, 7-bit: non-ASCII characters as RFC 6533 §3 ``\\x{HHHH}`` escapes; at most
    ``limit`` characters after escaping (an escape is 8 of them: a line stays under 998)."""
    text = one_line(text, limit)
    if text.isascii():
        return text
    out, size = [], 0
    for c in text:
        piece = c if c.isascii() else f"\\x{{{ord(c):04X}}}"
        if size + len(piece) > limit - 3:
            out.append("...")
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


def utf8_prefix(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut (with "...") to at most ``limit`` octets of UTF-8: a line of a message."""
    if len(text.encode("utf-8", "surrogateescape")) <= limit:
        return text
    cut = text.encode("utf-8", "surrogateescape")[: limit - 3].decode("utf-8", "ignore")
    return cut + "..."


@dataclass(frozen=True)
class Reply:
    code: int
    text: str
    relay: str = ""  # who gave this reply, for the log ("mda", "mx.example.org[192.0.2.1]")
    dsn_passed: bool = False  # the host advertised DSN and got our NOTIFY/ORCPT

    def __post_init__(self) -> None:
        clean = one_line(self.text)
        if clean is not self.text:
            object.__setattr__(self, "text", clean)

    @property
    def line(self) -> str:
        return f"{self.code} {self.text}"

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300
