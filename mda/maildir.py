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
                   owner: tuple[int, int] | None = None, key: str = "",
                   flags: str = "") -> Unpublished:
    """Write ``message`` into the tmp/ of the maildir at ``path`` (which must exist); its
    final name is in new/ (store/fsio.py commits it: fsync, rename, fsync new/), or with
    ``flags`` (maildir info letters, "FS") in cur/ as ``<name>:2,<flags>``."""
    name = names.next(len(message), key=key)
    base = os.fspath(path)
    final = f"{base}/cur/{name}:2,{flags}" if flags else f"{base}/new/{name}"
    return write_unpublished(f"{base}/tmp/{name}", final, message, 0o600, owner)


# IMAP system flags as maildir info letters (https://cr.yp.to/proto/maildir.html); keywords
# have no letter of their own here and are left out.
FLAG_LETTERS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S",
                "\\Deleted": "T"}


def info_letters(flags: list[str]) -> str:
    return "".join(sorted({FLAG_LETTERS[f] for f in flags if f in FLAG_LETTERS}))


def folder_path(mailbox: Path, folder: str) -> Path:
    """The maildir++ folder ``A/B`` of a mailbox: ``<mailbox>/.A.B`` (names in IMAP's
    modified UTF-7, as Dovecot keeps them); ValueError for a name that cannot be one."""
    parts = folder.split("/")
    if not parts or any(not p or p in (".", "..") or any(ord(c) < 0x20 or c == "\x7f"
                                                         for c in p) for p in parts):
        raise ValueError(f"bad folder name {folder!r}")
    return mailbox / ("." + ".".join(imap_utf7(p) for p in parts))


def imap_utf7(name: str) -> str:
    """RFC 3501 §5.1.3 modified UTF-7: "&" as "&-", non-ASCII runs as "&<base64>-"."""
    import base64

    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            b64 = base64.b64encode("".join(run).encode("utf-16-be")).decode().rstrip("=")
            out.append("&" + b64.replace("/", ",") + "-")
            run.clear()

    for c in name:
        if 0x20 <= ord(c) <= 0x7e:
            flush()
            out.append("&-" if c == "&" else c)
        else:
            run.append(c)
    flush()
    return "".join(out)


def ensure_folder(path: Path, owner: tuple[int, int] | None = None) -> bool:
    """A maildir++ folder: a maildir with the ``maildirfolder`` marker file; whether it was
    made now."""
    ensure_maildir(path, owner)
    marker = path / "maildirfolder"
    if marker.exists():
        return False
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600)
    if owner is not None:
        os.fchown(fd, *owner)
    os.close(fd)
    return True
