"""Maildir delivery: the message is durable in ``new/`` before we say 250.

tmp/ write -> fsync file -> rename into new/ -> fsync new/. A crash at any point leaves either
nothing in new/ or the whole message; stray tmp/ files are what Dovecot already cleans up after
36 hours. Names follow https://cr.yp.to/proto/maildir.html plus Dovecot's
``,S=<size>`` so it need not stat the file.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path

from store.fsio import Unpublished, ensure_dir, fsync_dirs, write_unpublished


class UniqueNames:
    """Maildir file names unique across processes (pid) and within one (a counter)."""

    def __init__(self, host: str | None = None) -> None:
        raw = host or socket.gethostname()
        # '/' and ':' cannot appear in the host part (':' starts the info suffix).
        self.host = raw.replace("/", r"\057").replace(":", r"\072")
        self._counter = itertools.count(1)

    def next(self, size: int, now: float | None = None, key: str = "") -> str:
        """``key`` (a delivery key: hex digits and '-') is put in the unique part, where
        ``find_copy`` finds it again."""
        t = time.time() if now is None else now
        sec = int(t)
        usec = int((t - sec) * 1_000_000)
        tag = f"_{key}" if key else ""
        return f"{sec}.M{usec}P{os.getpid()}Q{next(self._counter)}{tag}.{self.host},S={size}"


def find_copy(path: Path, key: str) -> str | None:
    """The file in new/ or cur/ (where a reader moves it, renamed with flags) whose name holds
    ``key``, made durable where it is; None if there is none. A listing of both folders: only
    for a delivery that may have been made before (XRETRY), never on the usual path."""
    needle = f"_{key}."
    for sub in ("new", "cur"):
        folder = os.path.join(path, sub)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            if needle in name:
                # The earlier attempt may have died before its fsync of new/.
                fsync_dirs([folder])
                return f"{sub}/{name}"
    return None


def ensure_maildir(path: Path, owner: tuple[int, int] | None = None) -> None:
    for sub in ("cur", "new", "tmp"):
        ensure_dir(path / sub, 0o700, owner)


def write_unsynced(path: Path, message: bytes, names: UniqueNames,
                   owner: tuple[int, int] | None = None, key: str = "") -> Unpublished:
    """Write ``message`` into the tmp/ of the maildir at ``path`` (which must exist); its
    final name is in new/ (store/fsio.py commits it: fsync, rename, fsync new/)."""
    name = names.next(len(message), key=key)
    base = os.fspath(path)
    return write_unpublished(f"{base}/tmp/{name}", f"{base}/new/{name}", message, 0o600, owner)
