"""mbox delivery in mboxrd format, locked the way Dovecot and mutt lock.

Each message is ``From <sender> <asctime>\\n``, the message with every line matching
``^>*From `` given one more '>' (mboxrd: reversible, unlike stdlib mailbox.mbox's mboxo), and a
blank line. Locks, in Dovecot's default write order: a ``<mbox>.lock`` dotlock, then an fcntl
write lock on the file; inside one process a threading lock too, because fcntl locks belong to
the process and would not keep two of our own threads apart. On any failure the file is
truncated back to its old length, so no partial message stays behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from store.fsio import create_dotlock, ensure_dir, wait_for_lock

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_QUOTED_FROM = re.compile(rb"^>(>*From )", re.MULTILINE)
DOTLOCK_STALE = 300.0  # seconds after which a dotlock is considered left by a dead process
LOCK_TIMEOUT = 60.0


class LockTimeout(OSError):
    pass


def quote(message: bytes) -> bytes:
    """mboxrd quoting: one more '>' before each line matching ``^>*From ``."""
    return _FROM_LINE.sub(rb">\1", message)


def unquote(message: bytes) -> bytes:
    return _QUOTED_FROM.sub(rb"\1", message)


def from_line(mail_from: str, when: float | None = None) -> bytes:
    sender = mail_from if mail_from not in ("", "<>") else "MAILER-DAEMON"
    sender = "".join(c for c in sender if not c.isspace()) or "MAILER-DAEMON"
    stamp = time.asctime(time.gmtime(when))
    return f"From {sender} {stamp}\n".encode()


# The headers Dovecot keeps a message's mbox state in. A sender's own would set its flags,
# its UID or the folder's UIDVALIDITY, so they are dropped on the way in (as Dovecot's own
# delivery does); flags a Sieve script sets are written into them instead.
_STATE_HEADER = re.compile(
    rb"(?im)^(?:content-length|status|x-imap|x-imapbase|x-keywords|x-status|x-uid)[ \t]*:")
_STATUS = {"\\Seen": b"R"}
_X_STATUS = {"\\Answered": b"A", "\\Flagged": b"F", "\\Draft": b"T", "\\Deleted": b"D"}


def with_state(message: bytes, flags: Sequence[str] = ()) -> bytes:
    """``message`` (LF endings) without a sender's mbox state headers, with ``flags`` (IMAP
    flags and keywords) as ``Status``, ``X-Status`` and ``X-Keywords`` at the end of its
    header section."""
    end = message.find(b"\n\n")
    head, body = (message[:end + 1], message[end + 1:]) if end >= 0 else (message, b"")
    if not flags and not _STATE_HEADER.search(head):
        return message
    kept: list[bytes] = []
    dropping = False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):  # a continuation belongs to the field before it
            if not dropping:
                kept.append(line)
            continue
        dropping = _STATE_HEADER.match(line) is not None
        if not dropping:
            kept.append(line)
    if kept and not kept[-1].endswith(b"\n"):
        kept[-1] += b"\n"
    status = b"".join(_STATUS.get(f, b"") for f in flags)
    x_status = b"".join(_X_STATUS.get(f, b"") for f in flags)
    keywords = [f for f in flags if not f.startswith("\\")]
    if status:
        kept.append(b"Status: " + status + b"\n")
    if x_status:
        kept.append(b"X-Status: " + x_status + b"\n")
    if keywords:
        kept.append(b"X-Keywords: " + " ".join(keywords).encode("utf-8", "replace") + b"\n")
    return b"".join(kept) + (body or b"\n")


def entry(message: bytes, mail_from: str, when: float | None = None,
          flags: Sequence[str] = ()) -> bytes:
    """One complete mbox entry for ``message`` (LF line endings) with its ``flags``."""
    body = quote(with_state(message, flags))
    if not body.endswith(b"\n"):
        body += b"\n"
    return from_line(mail_from, when) + body + b"\n"


def split_entries(mbox: bytes) -> list[bytes]:
    """The messages of an mboxrd file, unquoted (for tests and tools)."""
    # Each entry is a From line, the message (ending in LF) and one blank line.
    parts = re.split(rb"(?:^|(?<=\n)\n)From [^\n]*\n", mbox)[1:]
    if parts and parts[-1].endswith(b"\n\n"):
        parts[-1] = parts[-1][:-1]
    return [unquote(p) for p in parts]


class MboxWriter:
    """Appends to mbox files; one instance per process holds the per-path thread locks."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def _thread_lock(self, path: Path) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(str(path), threading.Lock())

    def deliver(self, path: Path, message: bytes, mail_from: str,
                owner: tuple[int, int] | None = None, flags: Sequence[str] = ()) -> None:
        ensure_dir(path.parent, 0o700, owner)
        data = entry(message, mail_from, flags=flags)
        with self._thread_lock(path), _dotlock(path), _open_locked(path) as fd:
            if owner is not None:
                os.fchown(fd, *owner)
            old_size = os.fstat(fd).st_size
            try:
                if old_size:
                    # A file not ending in a blank line would glue our From line to its last
                    # message; add the separator it lacks.
                    tail = os.pread(fd, 2, old_size - min(2, old_size))
                    if not tail.endswith(b"\n\n"):
                        data = (b"\n" if tail.endswith(b"\n") else b"\n\n") + data
                _write_all(fd, data, old_size)
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, old_size)
                    os.fsync(fd)
                raise


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


@contextlib.contextmanager
def _open_locked(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not wait_for_lock(fd, fcntl.lockf, LOCK_TIMEOUT):
            raise LockTimeout(errno.ETIMEDOUT, f"fcntl lock on {path} timed out")
        yield fd
    finally:
        os.close(fd)  # closing releases the fcntl lock


@contextlib.contextmanager
def _dotlock(path: Path) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    fd = create_dotlock(lock, LOCK_TIMEOUT, DOTLOCK_STALE)
    if fd is None:
        raise LockTimeout(errno.ETIMEDOUT, f"dotlock {lock} timed out")
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
