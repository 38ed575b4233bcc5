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

from store.batching import fsync_all, fsync_dirs
from store.fsio import ensure_dir


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


@dataclass
class Unsynced:
    """A message written into tmp/, not yet fsynced nor moved to new/."""

    fd: int
    tmp: str  # paths as strings: pathlib was a tenth of the MDA's CPU
    final: str
    maildir: Path


def write_unsynced(path: Path, message: bytes, names: UniqueNames,
                   owner: tuple[int, int] | None = None, key: str = "") -> Unsynced:
    """Write ``message`` into the tmp/ of the maildir at ``path`` (which must exist)."""
    name = names.next(len(message), key=key)
    base = os.fspath(path)
    tmp = f"{base}/tmp/{name}"
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
    return Unsynced(fd, tmp, f"{base}/new/{name}", Path(path))


def move_into_new(batch: list[Unsynced], synced: list[OSError | None]
                  ) -> tuple[list[OSError | None], dict[str, list[int]]]:
    """After the fsyncs (``synced``: each file's error or None): close each file and rename the
    synced ones into new/. Returns each item's error and the new/ directories to fsync, with the
    items in each."""
    errors: list[OSError | None] = list(synced)
    moved: dict[str, list[int]] = {}
    for i, item in enumerate(batch):
        os.close(item.fd)
        if errors[i] is None:
            try:
                os.rename(item.tmp, item.final)  # unique names: never replaces a message
                moved.setdefault(os.path.dirname(item.final), []).append(i)
                continue
            except OSError as e:
                errors[i] = e
        with contextlib.suppress(OSError):
            os.unlink(item.tmp)
    return errors, moved


def drop_unsynced(batch: list[Unsynced], errors: list[OSError | None],
                  moved: dict[str, list[int]], dir_errors: dict[str, OSError | None]) -> None:
    """A new/ whose fsync failed: its messages are not durable; better no copy than one we
    cannot promise (the MTA retries)."""
    for directory, indexes in moved.items():
        error = dir_errors.get(directory)
        if error is not None:
            for i in indexes:
                errors[i] = error
                with contextlib.suppress(OSError):
                    os.unlink(batch[i].final)


def commit(batch: list[Unsynced]) -> list[OSError | None]:
    """Make written messages durable in new/ (blocking): fsync each file, rename it into new/,
    fsync each new/ once."""
    errors, moved = move_into_new(batch, fsync_all([item.fd for item in batch]))
    drop_unsynced(batch, errors, moved, fsync_dirs(list(moved)))
    return errors
