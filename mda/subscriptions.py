"""Subscribing a folder the MDA made (Sieve ``fileinto``) in Dovecot's subscriptions file,
so that mail clients showing only subscribed folders (Thunderbird's and Roundcube's default)
show it.

The file is Dovecot 2.3's version 2: the header ``V<TAB>2``, an empty line, then one folder a
line with its levels separated by a tab, each in IMAP's modified UTF-7. It is changed the way
Dovecot changes it: the new content is written to the dotlock ``<file>.lock`` (made with
O_EXCL), fsynced and renamed over the file. A file in the old format (no header) is left
alone. Subscribing is a convenience: a failure is the caller's log line, never a lost message.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mda.maildir import imap_utf7
from store.fsio import create_dotlock

HEADER = b"V\t2\n\n"
LOCK_WAIT = 5.0  # seconds; Dovecot holds the lock for a moment only
LOCK_STALE = 30.0  # Dovecot's own stale time for this lock


class OldFormat(OSError):
    """A subscriptions file without the version 2 header: not ours to rewrite."""


def maildir_file(mailbox: Path) -> Path:
    return mailbox / "subscriptions"


def mbox_file(inbox: Path) -> Path:
    # The folders of an mbox user live in <domain>/.<local>/ (mda/deliver.py).
    return inbox.parent / ("." + inbox.name) / ".subscriptions"


def entry(folder: str) -> bytes:
    """The line for ``folder`` ("A/B"): levels tab-separated, in modified UTF-7."""
    return "\t".join(imap_utf7(p) for p in folder.split("/")).encode("ascii") + b"\n"


def with_folder(current: bytes, folder: str) -> bytes | None:
    """The file's new content with ``folder`` subscribed; None if it is already."""
    if current and not current.startswith(HEADER):
        raise OldFormat("subscriptions file in Dovecot's old format")
    line = entry(folder)
    lines = current[len(HEADER):].splitlines(keepends=True) if current else []
    if line in lines or line.rstrip(b"\n") in lines:
        return None
    body = b"".join(lines)
    if body and not body.endswith(b"\n"):
        body += b"\n"
    return HEADER + body + line


def subscribe(path: Path, folder: str, owner: tuple[int, int] | None = None) -> bool:
    """Add ``folder`` to the subscriptions file at ``path``; whether it changed. OSError
    (OldFormat, a lock held too long...) when it could not be done."""
    lock = path.with_name(path.name + ".lock")
    fd = create_dotlock(lock, LOCK_WAIT, LOCK_STALE, poll=0.05)
    if fd is None:
        raise TimeoutError(f"{lock} is held")
    renamed = False
    try:
        try:
            current = path.read_bytes()
        except FileNotFoundError:
            current = b""
        new = with_folder(current, folder)
        if new is None:
            return False
        if owner is not None:
            os.fchown(fd, *owner)
        view = memoryview(new)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.rename(lock, path)
        renamed = True
        return True
    finally:
        os.close(fd)
        if not renamed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
