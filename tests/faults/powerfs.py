"""A FUSE file system that forgets, on command, everything not yet made durable: a power cut.

    python powerfs.py BACKING MOUNTPOINT

Every operation passes through to the BACKING directory, so programs see an ordinary file
system. Beside it, a model of what a disk would still hold after a power cut, stricter than a
real one (and than LazyFS, which keeps every metadata change):

- a file's data is durable as of its last fsync/fdatasync (before that: empty);
- a directory's entries (creates, renames, unlinks, mkdirs) are durable as of its last fsync;
  a new directory's own entries only once it is fsynced itself.

syncfs(2) reaches no FUSE file system, so it makes nothing durable here, as on many real ones.

Creating the file ``/.powercut`` is the cut: BACKING is rebuilt from the model (files get
their durable bytes, directories their durable entries), and every later operation fails
with EIO until the file system is unmounted. A new mount starts with all of BACKING durable.
"""

from __future__ import annotations

import errno
import inspect
import os
import shutil
import sys
import threading
from typing import Any

import mfusepy as fuse

CUT = "/.powercut"
OPERATIONS = {"getattr", "access", "readdir", "statfs", "chmod", "chown", "utimens", "mkdir",
              "rmdir", "unlink", "rename", "link", "create", "open", "read", "write",
              "truncate", "flush", "release", "fsync", "fsyncdir"}


class PowerCutFS(fuse.Operations):  # type: ignore[misc]
    use_ns = True  # times in nanoseconds (mfusepy)

    def __init__(self, backing: str) -> None:
        self.root = os.path.realpath(backing)
        self._mutex = threading.RLock()
        self.dead = False
        self.kind: dict[int, str] = {}  # inode -> "d" or "f"
        self.data: dict[int, bytes] = {}  # inode -> bytes as of its last fsync
        self.dirs: dict[int, dict[str, int]] = {}  # inode -> entries as of its last fsync
        self.fds: set[int] = set()
        self.root_ino = os.lstat(self.root).st_ino
        self._snapshot(self.root)

    # -- the model --------------------------------------------------------------------------

    def _snapshot(self, path: str) -> None:
        """All of ``path`` is durable (at mount)."""
        st = os.lstat(path)
        self.kind[st.st_ino] = "d"
        entries = {}
        for name in os.listdir(path):
            child = os.path.join(path, name)
            cst = os.lstat(child)
            entries[name] = cst.st_ino
            if os.path.isdir(child):
                self._snapshot(child)
            else:
                self.kind[cst.st_ino] = "f"
                with open(child, "rb") as f:
                    self.data[cst.st_ino] = f.read()
        self.dirs[st.st_ino] = entries

    def _cut(self) -> None:
        self.dead = True
        for fd in list(self.fds):
            os.close(fd)
        self.fds.clear()
        rebuilt = self.root + ".rebuilt"
        shutil.rmtree(rebuilt, ignore_errors=True)
        self._build(self.root_ino, rebuilt)
        lost = self.root + ".lost"
        os.rename(self.root, lost)
        os.rename(rebuilt, self.root)
        shutil.rmtree(lost)

    def _build(self, ino: int, path: str) -> None:
        os.mkdir(path, 0o700)
        for name, child in self.dirs.get(ino, {}).items():
            if self.kind.get(child) == "d":
                self._build(child, os.path.join(path, name))
            else:
                with open(os.path.join(path, name), "wb") as f:
                    f.write(self.data.get(child, b""))

    # -- plumbing ---------------------------------------------------------------------------

    def _path(self, path: str) -> str:
        return self.root + path

    def __getattribute__(self, name: str) -> Any:
        """Every operation under one lock (the cut must see no operation half done), and none
        once the power is off."""
        attr = object.__getattribute__(self, name)
        if name not in OPERATIONS:
            return attr
        mutex = object.__getattribute__(self, "_mutex")

        def guarded(*args: Any) -> Any:
            with mutex:
                if object.__getattribute__(self, "dead"):
                    raise fuse.FuseOSError(errno.EIO)
                try:
                    return attr(*args)
                except fuse.FuseOSError:
                    raise
                except OSError as e:
                    if os.environ.get("POWERFS_DEBUG"):
                        print(name, args, repr(e), file=sys.stderr, flush=True)
                    raise fuse.FuseOSError(e.errno or errno.EIO) from None

        guarded.__signature__ = inspect.signature(attr)  # type: ignore[attr-defined]
        return guarded

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.lstat(self._path(path))
        out = {k: getattr(st, k) for k in ("st_gid", "st_mode", "st_nlink", "st_size",
                                           "st_uid", "st_ino")}
        out.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return out

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._path(path), amode):
            raise fuse.FuseOSError(errno.EACCES)
        return 0

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._path(path))]

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._path(path))
        return {k: getattr(st, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize",
                                            "f_favail", "f_ffree", "f_files", "f_flag",
                                            "f_frsize", "f_namemax")}

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._path(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._path(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        if times is None:
            os.utime(self._path(path))
        else:
            os.utime(self._path(path), ns=times)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._path(path), mode)
        self.kind[os.lstat(self._path(path)).st_ino] = "d"
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._path(path))
        return 0

    def unlink(self, path: str) -> int:
        os.unlink(self._path(path))
        return 0

    def rename(self, old: str, new: str) -> int:
        os.rename(self._path(old), self._path(new))
        return 0

    def link(self, target: str, source: str) -> int:
        os.link(self._path(source), self._path(target))
        return 0

    def create(self, path: str, mode: int, flags: int = 0) -> int:
        if path == CUT:
            self._cut()
            raise fuse.FuseOSError(errno.EIO)  # the machine is off now
        # Read-write whatever the caller asked: fsync reads the data back for the model.
        fd = os.open(self._path(path), os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        self.kind[os.fstat(fd).st_ino] = "f"
        self.fds.add(fd)
        return fd

    def open(self, path: str, flags: int) -> int:
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_ACCMODE | os.O_APPEND)  # (the kernel appends)
        fd = os.open(self._path(path), flags | os.O_RDWR)
        self.kind.setdefault(os.fstat(fd).st_ino, "f")
        self.fds.add(fd)
        return fd

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._path(path), length)
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        if fh in self.fds:
            self.fds.discard(fh)
            os.close(fh)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        st = os.fstat(fh)
        self.data[st.st_ino] = os.pread(fh, st.st_size, 0) if st.st_size else b""
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        full = self._path(path)
        self.dirs[os.lstat(full).st_ino] = {
            name: os.lstat(os.path.join(full, name)).st_ino for name in os.listdir(full)}
        return 0


def main() -> None:
    backing, mountpoint = sys.argv[1], sys.argv[2]
    fuse.FUSE(PowerCutFS(backing), mountpoint, foreground=True, nothreads=False,
              fsname="powercut")


if __name__ == "__main__":
    main()
