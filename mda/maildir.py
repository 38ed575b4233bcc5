"""Maildir delivery: the message is durable in ``new/`` before we say 250.

tmp/ write -> fsync file -> link into new/ -> unlink tmp -> fsync new/. A crash at any point
leaves either nothing in new/ or the whole message; stray tmp/ files are what Dovecot already
cleans up after 36 hours. Names follow https://cr.yp.to/proto/maildir.html plus Dovecot's
``,S=<size>`` so it need not stat the file.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path

from store.fsio import GroupDirSync, ensure_dir, fsync_dir, write_file_synced


class UniqueNames:
    """Maildir file names unique across processes (pid) and within one (a counter)."""

    def __init__(self, host: str | None = None) -> None:
        raw = host or socket.gethostname()
        # '/' and ':' cannot appear in the host part (':' starts the info suffix).
        self.host = raw.replace("/", r"\057").replace(":", r"\072")
        self._counter = itertools.count(1)

    def next(self, size: int, now: float | None = None) -> str:
        t = time.time() if now is None else now
        sec = int(t)
        usec = int((t - sec) * 1_000_000)
        return f"{sec}.M{usec}P{os.getpid()}Q{next(self._counter)}.{self.host},S={size}"


def ensure_maildir(path: Path, owner: tuple[int, int] | None = None) -> None:
    for sub in ("cur", "new", "tmp"):
        ensure_dir(path / sub, 0o700, owner)


def deliver(path: Path, message: bytes, names: UniqueNames,
            owner: tuple[int, int] | None = None, known: bool = False,
            dirsync: GroupDirSync | None = None) -> Path:
    """Write ``message`` into the maildir at ``path``; return its file in new/.

    ``known``: the maildir existed at an earlier delivery (if it was removed since, the
    write fails with ENOENT and we create it and try once more).
    """
    if not known:
        ensure_maildir(path, owner)
    try:
        return _deliver(path, message, names, owner, dirsync)
    except FileNotFoundError:
        if not known:
            raise
        ensure_maildir(path, owner)
        return _deliver(path, message, names, owner, dirsync)


def _deliver(path: Path, message: bytes, names: UniqueNames,
             owner: tuple[int, int] | None, dirsync: GroupDirSync | None) -> Path:
    name = names.next(len(message))
    tmp = path / "tmp" / name
    final = path / "new" / name
    write_file_synced(tmp, message, 0o600, owner)
    try:
        os.link(tmp, final)
    finally:
        os.unlink(tmp)
    try:
        if dirsync is not None:
            dirsync.sync(path / "new")  # shared with concurrent deliveries to this mailbox
        else:
            fsync_dir(path / "new")
    except BaseException:
        os.unlink(final)  # not durable: better no copy than one we cannot promise
        raise
    return final
