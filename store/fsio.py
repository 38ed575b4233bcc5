"""File-system primitives for durability, shared by the spool and the mailboxes.

POSIX only promises that a file survives a crash once the file is fsynced AND the directory
entry pointing at it is fsynced; ``rename``/``link`` alone are not durable. Every write that
precedes a 250 goes through here, in one order: write a temporary file (``Unpublished``),
fsync it, rename it to its final name (``publish``), fsync the directory, and take the file
back (``retract``) if that last fsync failed. ``commit_files`` does it for a batch, blocking;
``DiskSync.commit`` (store/batching.py) from the event loop, with the group commit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


@functools.cache
def _libc_syncfs() -> Callable[[int], int] | None:
    """libc's syncfs(2), where it reports write-back errors: Linux 5.8 and later (before,
    it returned 0 whatever happened, so a failed write would pass for durable). Looked up on
    first use, not at import: most commands never sync a batch."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
        if (major, minor) < (5, 8):
            return None
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (ValueError, OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def syncfs_available() -> bool:
    return _libc_syncfs() is not None


# File systems whose syncfs(2) writes and flushes every file of the file system (statfs
# f_type, linux/magic.h). Elsewhere it may flush nothing at all: FUSE (mergerfs, sshfs, s3fs),
# 9p, overlayfs over them, NFS... A power cut then took thousands of 250'd messages that a
# syncfs had "made durable" (measured with LazyFS), so there every file gets its own fsync.
SYNCFS_FLUSHES = {
    0xEF53: "ext4",  # ext2/3/4 share the magic
    0x58465342: "xfs",
    0x9123683E: "btrfs",
}


@functools.cache
def _libc_fstatfs() -> Callable[[int, ctypes.Array[ctypes.c_char]], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).fstatfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p]
    fn.restype = ctypes.c_int
    return fn


def filesystem_type(fd: int) -> int | None:
    """The statfs(2) f_type (a magic number) of the file system holding ``fd``; None if it
    cannot be had (not Linux)."""
    fn = _libc_fstatfs()
    if fn is None:
        return None
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if fn(fd, buf) != 0:
        return None
    # f_type is the first member, a native long (__fsword_t).
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def syncfs_flushes(fd: int) -> bool:
    """Whether one syncfs on the file system of ``fd`` makes its files durable."""
    return syncfs_available() and filesystem_type(fd) in SYNCFS_FLUSHES


def syncfs(fd: int) -> None:
    """Write out and flush everything dirty on the file system that holds ``fd``: Linux
    promises for it what fsync of each file (and directory) of that file system promises,
    with one cache flush of the disk instead of one each (man 2 syncfs)."""
    fn = _libc_syncfs()
    if fn is None:
        raise OSError(errno.ENOSYS, "syncfs is not available")
    if fn(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Unpublished:
    """A file written under a temporary name, open, not yet durable nor under its final name.
    Paths are strings: pathlib on the hot paths cost a fifth of a process's CPU."""

    fd: int
    tmp: str
    final: str


def write_unpublished(tmp: str, final: str, data: bytes, mode: int = 0o600,
                      owner: tuple[int, int] | None = None) -> Unpublished:
    """Create ``tmp`` (which must not exist) holding ``data``; nothing synced yet."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    return Unpublished(fd, tmp, final)


def publish(files: Sequence[Unpublished], synced: Sequence[OSError | None]
            ) -> tuple[list[OSError | None], dict[str, list[int]]]:
    """After the files' fsyncs (``synced``: each one's error or None): close each file and
    rename the synced ones to their final names; the others are removed. Returns each file's
    error and the directories now to fsync, with the files in each."""
    errors: list[OSError | None] = list(synced)
    renamed: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        os.close(f.fd)
        if errors[i] is None:
            try:
                os.rename(f.tmp, f.final)
                renamed.setdefault(os.path.dirname(f.final), []).append(i)
                continue
            except OSError as e:
                errors[i] = e
        _unlink_quietly(f.tmp)
    return errors, renamed


def retract(files: Sequence[Unpublished], errors: list[OSError | None],
            renamed: dict[str, list[int]], dir_errors: dict[str, OSError | None]) -> None:
    """A directory whose fsync failed: the files renamed into it are not durable; better none
    than one we cannot promise (the sender is told to retry)."""
    for directory, indexes in renamed.items():
        error = dir_errors.get(directory)
        if error is not None:
            for i in indexes:
                errors[i] = error
                _unlink_quietly(files[i].final)


def abandon(files: Sequence[Unpublished]) -> None:
    """Written files given up before ``publish`` (an exception, a cancellation)."""
    for f in files:
        with contextlib.suppress(OSError):
            os.close(f.fd)
        _unlink_quietly(f.tmp)


def fsync_each(fds: Sequence[int]) -> list[OSError | None]:
    """fsync each descriptor, one after the other; the error of each, or None."""
    return [_error_of(os.fsync, fd) for fd in fds]


def fsync_dirs(dirs: Sequence[str]) -> dict[str, OSError | None]:
    """fsync each directory once, one after the other; the error of each, or None."""
    return {d: _error_of(fsync_dir, d) for d in dirs}


def commit_files(files: Sequence[Unpublished]) -> list[OSError | None]:
    """Make written files durable under their final names (blocking): fsync each, rename,
    fsync each directory once; each file's error, or None."""
    errors, renamed = publish(files, fsync_each([f.fd for f in files]))
    retract(files, errors, renamed, fsync_dirs(list(renamed)))
    return errors


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` all at once (``commit_files`` of one file)."""
    final = os.fspath(path)
    tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.{os.getpid()}.tmp")
    _unlink_quietly(tmp)
    [error] = commit_files([write_unpublished(tmp, final, data, mode)])
    if error is not None:
        raise error


def ensure_dir(path: str | os.PathLike[str], mode: int = 0o700,
               owner: tuple[int, int] | None = None) -> Path:
    """Create ``path`` and any missing parents; fsync each parent of a directory we created.

    ``owner`` (uid, gid) is given to the directories created here, not to existing ones.
    """
    p = Path(path)
    missing: list[Path] = []
    q = p
    while not q.exists():
        missing.append(q)
        q = q.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue
        if owner is not None:
            os.chown(d, *owner)
        fsync_dir(d.parent)
    return p


def _unlink_quietly(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _error_of(fn: Callable[[T], object], arg: T) -> OSError | None:
    try:
        fn(arg)
    except OSError as e:
        return e
    return None


def wait_for_lock(fd: int, lock: Callable[[int, int], None], timeout: float,
                  poll: float = 0.02) -> bool:
    """Take an exclusive ``lock`` (fcntl.flock or fcntl.lockf) on ``fd``, polling until
    ``timeout``; False if it stayed busy. Polling keeps the wait bounded and interruptible."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() > deadline:
                return False
            time.sleep(poll)


def create_dotlock(lock: str | os.PathLike[str], timeout: float, stale: float,
                   poll: float = 0.02) -> int | None:
    """Create the dotlock file ``lock`` (O_EXCL; mode 0600) and return its fd, waiting until
    ``timeout`` while another holds it; one older than ``stale`` seconds is taken as left
    by a dead process and removed. None if it stayed held."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.stat(lock).st_mtime > stale:
                    os.unlink(lock)
                    continue
            if time.monotonic() > deadline:
                return None
            time.sleep(poll)
