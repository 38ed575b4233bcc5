"""Maildir delivery: the message is durable in ``new/`` before we say 250.

tmp/ write -> fsync file -> rename into new/ -> fsync new/. A crash at any point leaves either
nothing in new/ or the whole message; stray tmp/ files are what Dovecot already cleans up after
36 hours. Names follow https://cr.yp.to/proto/maildir.html plus Dovecot's
``,S=<size>`` so it need not stat the file.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from store.fsio import ensure_dir, fsync_dir


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


@dataclass
class Unsynced:
    """A message written into tmp/, not yet fsynced nor moved to new/."""

    fd: int
    tmp: Path
    final: Path


def write_unsynced(path: Path, message: bytes, names: UniqueNames,
                   owner: tuple[int, int] | None = None) -> Unsynced:
    """Write ``message`` into the tmp/ of the maildir at ``path`` (which must exist)."""
    name = names.next(len(message))
    tmp = path / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        view = memoryview(message)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Unsynced(fd, tmp, path / "new" / name)


def commit(batch: list[Unsynced]) -> list[OSError | None]:
    """Make each written message durable in new/: fsync each file, rename it, fsync each new/.

    For a batch, every file is written before the first fsync, so the file system commits them
    in one journal transaction; each new/ directory is fsynced once for all its messages.
    """
    errors: list[OSError | None] = [None] * len(batch)
    moved: dict[Path, list[int]] = {}
    for i, item in enumerate(batch):
        try:
            try:
                os.fsync(item.fd)
            finally:
                os.close(item.fd)
            os.rename(item.tmp, item.final)  # unique names: rename never replaces a message
            moved.setdefault(item.final.parent, []).append(i)
        except OSError as e:
            errors[i] = e
            with contextlib.suppress(OSError):
                os.unlink(item.tmp)
    for directory, indexes in moved.items():
        try:
            fsync_dir(directory)
        except OSError as e:
            for i in indexes:  # not durable: better no copy than one we cannot promise
                errors[i] = e
                with contextlib.suppress(OSError):
                    os.unlink(batch[i].final)
    return errors
