"""Forwarding to foreign addresses: the Sender Rewriting Scheme (SRS, via srslib) and the
checks that cut forwarding loops.

Mail an alias or a Sieve ``redirect`` sends on to another domain leaves with the envelope
sender ``SRS0=hash=time=orig-domain=orig-local@<our domain>`` so that SPF at the
destination checks our domain, not the original sender's. A bounce to that address comes
back to us: ``reverse`` checks the hash (an HMAC with the key in ``<data_dir>/srs.key``) and
the time stamp (21 days) and gives the original sender to pass it on to; a forged or expired
one is refused at RCPT.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import srslib

from mta.policy import MAX_RECEIVED
from store import addresses
from store.config import Config

KEY_FILE = "srs.key"


class ForgedSrs(ValueError):
    """An SRS address we did not make, or made too long ago."""


def is_srs(address: str) -> bool:
    return address[:5].upper() in ("SRS0=", "SRS1=", "SRS0+", "SRS1+", "SRS0-", "SRS1-")


def load_key(data_dir: str | os.PathLike[str]) -> str:
    """The HMAC key, made on first use (0600; every process of one host reads the same)."""
    path = Path(data_dir) / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
    key = path.read_text().strip()
    if not key:
        raise OSError(f"{path} is empty: remove it to make a new key")
    return key


class Srs:
    """The key is read (or made) on first use: after the process dropped its privileges,
    so that the file belongs to the user every process runs as."""

    def __init__(self, data_dir: str | os.PathLike[str] = "", key: str = "") -> None:
        self.data_dir = data_dir
        self._key = key
        self._lib: srslib.SRS | None = None

    @property
    def _srs(self) -> srslib.SRS:
        if self._lib is None:
            self._lib = srslib.SRS(self._key or load_key(self.data_dir))
        return self._lib

    def forward(self, sender: str, our_domain: str) -> str:
        """The envelope sender for a copy we forward; the null sender stays null."""
        if not sender or sender == "<>":
            return ""
        return str(self._srs.forward(sender, our_domain))

    def reverse(self, address: str) -> str:
        """Where a message to one of our SRS addresses goes (the original sender, or for
        SRS1 the first forwarder's SRS0 address); ForgedSrs if the hash or time is wrong."""
        try:
            original = str(self._srs.reverse(address))
        except srslib.Error as e:
            raise ForgedSrs(str(e)) from None
        try:
            return addresses.normalize(original)
        except addresses.AddressError as e:
            raise ForgedSrs(f"not an address inside: {e}") from None


_RECEIVED = re.compile(rb"(?im)^received:")
_DELIVERED_TO = re.compile(rb"(?im)^delivered-to:[ \t]*<?([^>\r\n]*)>?[ \t]*\r?$")


def loops(header_section: bytes, rcpt: str) -> str:
    """Why forwarding this message for ``rcpt`` would loop ("" if it would not): it already
    went through ``rcpt`` (a Delivered-To naming it), or it has too many Received headers."""
    for m in _DELIVERED_TO.finditer(header_section):
        if m.group(1).strip().decode("utf-8", "replace").lower() == rcpt.lower():
            return f"already delivered to {rcpt} (Delivered-To)"
    hops = len(_RECEIVED.findall(header_section))
    if hops > MAX_RECEIVED:  # the MTA's own limit: such a copy would be refused anyway
        return f"{hops} Received headers"
    return ""


def srs_of(cfg: Config) -> Srs | None:
    """The SRS of the processes that rewrite or reverse (the queue runner, the MTA), or None
    when ``[forwarding] srs`` is off."""
    return Srs(cfg.data_dir) if cfg.forwarding.srs else None
