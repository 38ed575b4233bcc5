"""The spool: each accepted message in ``spool_dir``, durable before we say 250.

- ``<id>.msg``: the envelope as one line of UTF-8 JSON and a LF, then the message exactly as it
  will be delivered (our Received header first), CRLF. Written as ``.<id>.tmp``, fsynced and
  renamed: the rename is the commit point, and one directory fsync makes a whole batch of
  renames durable. One file means one data fsync and, once delivered, one unlink per message.
- ``<id>.json``: the envelope alone, written (temp, fsync, rename, directory fsync) only when
  an attempt leaves recipients pending; it supersedes the envelope line of ``<id>.msg``.
- ``damaged/``: committed items that cannot be read (a message file emptied or torn by a
  file system that lost written data): moved there once, with an error in the log, and listed
  by ``pochta queue list``; never delivered, never deleted by us.

The envelope's schema is in mta/envelope.py.

Uncommitted leftovers of a crash (``.tmp`` files, a ``.json`` whose message is gone) are
removed once idle for an hour. Only the queue runner changes a committed item, under an flock
on its message file, which ``pochta queue`` takes too.

Delivered message files are deleted, not kept for reuse: reusing an inode lets a crash bring a
delivered message's name back on another sender's bytes; the cost of a new inode per message
is high only on ext4 without a journal, which is not what users run.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mta.envelope import Envelope, EnvelopeError
from store.batching import Batcher, DiskSync
from store.fsio import (
    Unpublished,
    abandon,
    atomic_write,
    commit_files,
    ensure_dir,
    fsync_dir,
    wait_for_lock,
)

log = logging.getLogger("pochta.spool")

GARBAGE_AGE = 3600.0  # seconds an uncommitted spool file must be idle before it is garbage
INLINE_MAX = 1 << 20  # messages up to this size are written from the event loop (page cache)
DAMAGED_DIR = "damaged"  # committed items that cannot be read: kept aside for the admin
HEARTBEAT = "runner.heartbeat"  # the queue runner's pid, rewritten every few seconds


class SpoolError(Exception):
    pass


# A message to spool: bytes, or pieces of it: bytes and (file, offset) meaning "that file from
# that offset to its end" (large messages arrive in a file and are copied by the kernel).
MessageParts = list["bytes | tuple[Path, int]"]


def read_header_section(path: Path, limit: int = 1 << 20, offset: int = 0) -> bytes:
    """The header section of a message in a file, through the CRLF of its last field."""
    with open(path, "rb") as f:
        f.seek(offset)
        head = f.read(limit)
    end = head.find(b"\r\n\r\n")
    return head if end < 0 else head[: end + 2]


@dataclass(frozen=True)
class SpooledMessage:
    """A message left on disk: ``path`` from ``offset`` to its end (large messages)."""

    path: Path
    offset: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read()

    def header_section(self) -> bytes:
        return read_header_section(self.path, offset=self.offset)

    def chunks(self, size: int = 1 << 16) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            while block := f.read(size):
                yield block


def write_parts(path: str, parts: MessageParts) -> int:
    """Create ``path`` from ``parts`` (files are copied in-kernel); return its open descriptor.

    The caller fsyncs and closes the descriptor: a batch writes every file before its first
    fsync.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        i = 0
        while i < len(parts):
            part = parts[i]
            if isinstance(part, bytes):
                run: list[bytes] = []  # consecutive byte strings: one writev
                while i < len(parts) and isinstance(parts[i], bytes):
                    run.append(parts[i])  # type: ignore[arg-type]
                    i += 1
                _writev_all(fd, run)
                continue
            src, offset = part
            with open(src, "rb") as f:
                remaining = os.fstat(f.fileno()).st_size - offset
                while remaining > 0:
                    n = os.sendfile(fd, f.fileno(), offset, min(remaining, 1 << 24))
                    if n == 0:
                        break
                    offset += n
                    remaining -= n
            i += 1
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd


def _writev_all(fd: int, buffers: list[bytes]) -> None:
    views = [memoryview(b) for b in buffers if b]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def parts_size(parts: MessageParts) -> int:
    return sum(len(p) if isinstance(p, bytes) else os.stat(p[0]).st_size - p[1] for p in parts)


def _parse(data: bytes) -> Envelope:
    try:
        return Envelope.from_json(data)
    except EnvelopeError as e:
        raise SpoolError(str(e)) from None


def _envelope_line(f: BinaryIO, limit: int = 1 << 24) -> bytes:
    """The first line of a layout-2 message file (its envelope), without the LF."""
    head = f.read(1 << 12)
    while b"\n" not in head:
        more = f.read(1 << 16)
        if not more or len(head) > limit:
            raise SpoolError("message file has no envelope line")
        head += more
    return head[: head.index(b"\n")]


class Spool:
    def __init__(self, directory: str | os.PathLike[str], use_syncfs: bool = True) -> None:
        self.dir = ensure_dir(directory, 0o700)
        self._dir = os.fspath(self.dir)  # hot paths build names with strings, not pathlib
        self.disk = DiskSync(self._dir, use_syncfs)
        self._batcher: Batcher[tuple[Envelope, bytes | MessageParts], None] = \
            Batcher(self._put_batch)

    async def commit(self, env: Envelope, message: bytes | MessageParts) -> None:
        """``put`` from the event loop, batched with concurrent callers (group commit)."""
        await self._batcher.submit((env, message))

    async def _put_batch(self, items: list[tuple[Envelope, bytes | MessageParts]]
                         ) -> list[None | BaseException]:
        """Write every file, fsync them all, rename them, then fsync the directory once: the
        fsyncs on the loop while the disk is fast, else in a worker thread, which then does
        nothing but fsyncs (see store/batching.py).

        Messages up to ``INLINE_MAX`` are written from the loop (page cache); larger ones and
        those with parts in files (sendfile) are written in the thread.
        """
        if len(items) == 1 and not self.disk.inline(1):  # one trip to the thread beats two
            try:
                await self.disk.run(1, 2, self.put, *items[0])
                return [None]
            except Exception as e:  # this item's fault only (see below)
                return [e]
        results: list[None | BaseException] = [None] * len(items)
        written: list[tuple[int, Unpublished]] = []  # (item index, its file)
        in_thread: list[int] = []
        for i, (env, message) in enumerate(items):
            if isinstance(message, bytes) and len(message) <= INLINE_MAX:
                try:
                    written.append((i, self._write_unsynced(env, message)))
                except Exception as e:  # one bad item (I/O, an envelope that does not
                    results[i] = e  # serialise) fails alone, never its batch
            else:
                in_thread.append(i)

        def write_rest_and_sync() -> list[OSError | None]:
            for i in in_thread:
                try:
                    written.append((i, self._write_unsynced(*items[i])))
                except Exception as e:
                    results[i] = e
            return self.disk.fsync_all([f.fd for _, f in written])

        synced = None  # the inline files are synced by commit, with the group
        if in_thread:
            try:
                synced = await asyncio.to_thread(write_rest_and_sync)
            except BaseException:
                abandon([f for _, f in written])
                raise
        # One directory sync makes the whole batch durable.
        errors = await self.disk.commit([f for _, f in written], len(items), synced)
        for (i, _), error in zip(written, errors, strict=True):
            if error is not None:
                results[i] = error
        return results

    # Names as strings: pathlib on these paths was a fifth of the queue runner's CPU.
    def _msg(self, qid: str) -> str:
        return f"{self._dir}/{qid}.msg"

    def _json(self, qid: str) -> str:
        return f"{self._dir}/{qid}.json"

    def put(self, env: Envelope, message: bytes | MessageParts) -> None:
        """Store a new message durably; when this returns, it survives a crash."""
        [error] = commit_files([self._write_unsynced(env, message)])
        if error is not None:
            raise error

    def _write_unsynced(self, env: Envelope, message: bytes | MessageParts) -> Unpublished:
        """The temporary file of a new item, written, not yet synced."""
        parts: MessageParts = [message] if isinstance(message, bytes) else message
        env.size = parts_size(parts)
        head = env.to_json() + b"\n"  # before any file exists: it may fail (bad text)
        tmp = f"{self._dir}/.{env.id}.tmp"
        return Unpublished(write_parts(tmp, [head, *parts]), tmp, self._msg(env.id))

    def save(self, env: Envelope) -> bool:
        """``update`` under the item's lock (from outside an attempt); False if it is gone."""
        with self.locked(env.id) as present:
            if present:
                self.update(env)
            return present

    def update(self, env: Envelope) -> None:
        atomic_write(self._json(env.id), env.to_json())

    def remove(self, qid: str) -> None:
        """Remove an item (its lock held).

        The message file first: once it is gone, nothing is delivered again, and a .json left
        by a crash is garbage. No directory fsync (as Postfix): a crash may bring a delivered
        message back; it is then retried, and the MDA recognises the maildir copies it already
        made (mta/courier/lmtp.py, XRETRY). A remote host or an mbox may get it twice, never none.
        """
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._msg(qid))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._json(qid))

    def load(self, qid: str, fresh: bool = False) -> Envelope:
        """The item's envelope; ``fresh``: just committed, so no attempt wrote a ``.json``."""
        if not fresh:
            try:
                with open(self._json(qid), "rb") as f:
                    env = _parse(f.read())
                if env.id == qid:
                    env.id = qid  # one string for the id, the queue's key and its timers
                return env
            except FileNotFoundError:
                pass
        with open(self._msg(qid), "rb") as f:
            env = _parse(_envelope_line(f))
        if env.id != qid:
            raise SpoolError(f"the file holds message {env.id}")
        env.id = qid
        return env

    def ids(self) -> list[str]:
        return sorted(name[:-4] for name in os.listdir(self._dir)
                      if name.endswith(".msg") and not name.startswith("."))

    def collect_garbage(self, min_age: float = GARBAGE_AGE) -> int:
        """Remove uncommitted leftovers of a crash (see the module's docstring).

        Only files untouched for ``min_age`` seconds: the MSA (another process) and sessions
        receiving a large message write these files right now, and a transfer in progress
        touches its file at least every idle timeout.
        """
        names = set(os.listdir(self._dir))
        cutoff = time.time() - min_age
        removed = 0
        for name in names:
            stem = name.rpartition(".")[0]
            uncommitted = (name.startswith(".") and name.endswith(".tmp")) or (
                name.endswith(".json") and not name.startswith(".")
                and f"{stem}.msg" not in names)
            if not uncommitted:
                continue
            path = f"{self._dir}/{name}"
            try:
                if os.stat(path).st_mtime > cutoff:
                    continue
                os.unlink(path)
                removed += 1
                log.info("removed uncommitted spool file %s", name)
            except FileNotFoundError:
                continue
        return removed

    def recover(self) -> list[Envelope]:
        """Every committed message; removes uncommitted leftovers of a crash and puts the
        damaged items aside."""
        self.collect_garbage()
        items = []
        for qid in self.ids():
            try:
                items.append(self.load(qid))
            except (OSError, ValueError, TypeError, SpoolError) as e:
                self.quarantine(qid, e)
        return items

    def quarantine(self, qid: str, why: BaseException) -> None:
        """Put a committed item that cannot be read into ``damaged/``, once, loudly: it was
        accepted, so it is neither delivered as garbage nor silently dropped."""
        damaged = ensure_dir(self.dir / DAMAGED_DIR, 0o700)
        moved = []
        for path in (self._msg(qid), self._json(qid)):
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, f"{damaged}/{os.path.basename(path)}")
                moved.append(os.path.basename(path))
        if moved:
            fsync_dir(self.dir)
            log.error("%s: damaged queue item (%s) moved to %s/: %s", qid,
                      ", ".join(moved), damaged, why)

    def damaged(self) -> list[tuple[str, int]]:
        """Items in ``damaged/``: (id, size of its message file)."""
        try:
            names = os.listdir(self.dir / DAMAGED_DIR)
        except FileNotFoundError:
            return []
        out = []
        for name in sorted(names):
            if name.endswith(".msg"):
                with contextlib.suppress(FileNotFoundError):
                    out.append((name[:-4], os.stat(self.dir / DAMAGED_DIR / name).st_size))
        return out

    def _open_message_file(self, qid: str) -> tuple[int, str] | None:
        """The item's message file, open for reading; None if gone."""
        path = self._msg(qid)
        try:
            return os.open(path, os.O_RDONLY), path
        except FileNotFoundError:
            return None

    def _open_locked(self, qid: str) -> tuple[int, str] | None:
        """The item's message file, open and flocked without waiting; None if busy or gone."""
        got = self._open_message_file(qid)
        if got is None:
            return None
        try:
            fcntl.flock(got[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(got[0])
            return None
        return got

    def committed(self, qid: str) -> bool:
        """Still in the queue (not delivered, not deleted)."""
        return os.path.exists(self._msg(qid))

    def checkout(self, qid: str, in_memory_max: int = 1 << 20
                 ) -> tuple[int, bytes | SpooledMessage] | None:
        """Lock a committed item and get its message (``message``); None if busy or gone.

        The message is read through the locked descriptor: one open per delivery attempt.
        """
        got = self._open_locked(qid)
        if got is None:
            return None
        fd, path = got
        try:
            st = os.fstat(fd)
            if not self._still_committed(qid, path, st):
                os.close(fd)  # removed (delivered or deleted) before we had the lock
                return None
            if st.st_size > in_memory_max:
                with open(fd, "rb", closefd=False) as f:
                    offset = len(_envelope_line(f)) + 1
                return fd, SpooledMessage(Path(path), offset)
            data = os.pread(fd, st.st_size, 0)
            while len(data) < st.st_size and (more := os.pread(fd, st.st_size - len(data),
                                                              len(data))):
                data += more
            end = data.find(b"\n")
            if end < 0:
                raise SpoolError("message file has no envelope line")
            return fd, data[end + 1:]
        except BaseException:
            os.close(fd)
            raise

    def _still_committed(self, qid: str, path: str, st: os.stat_result) -> bool:
        """Whether the locked file ``st`` (opened as ``path``) is still the item's.

        Between our open and our lock, another process may have removed the item: the name
        must still lead to the file we locked.
        """
        if st.st_nlink == 0:
            return False
        try:
            now = os.stat(path)
        except FileNotFoundError:
            return False
        return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)

    def checkin(self, env: Envelope, fd: int, done: bool | None = None) -> None:
        """Record an attempt's outcome, or remove the item once ``done`` (default: every
        recipient final; the runner says False while the sender's report is owed), and
        release its lock."""
        try:
            if env.finished if done is None else done:
                self.remove(env.id)
            else:
                self.update(env)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def locked(self, qid: str, timeout: float = 30.0) -> Iterator[bool]:
        """Hold the item's lock; yields False if the item is gone (delivered or deleted)."""
        got = self._open_message_file(qid)
        if got is None:
            yield False
            return
        fd, path = got
        try:
            if not wait_for_lock(fd, fcntl.flock, timeout, poll=0.05):
                raise SpoolError(f"queue item {qid} is busy")
            yield self._still_committed(qid, path, os.fstat(fd))
        finally:
            os.close(fd)

    def beat(self) -> None:
        """The queue runner's heartbeat: its pid in a file whose mtime says it is alive (read
        by `pochta status`; not a message: no fsync)."""
        tmp = f"{self._dir}/.{HEARTBEAT}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, f"{self._dir}/{HEARTBEAT}")

    def heartbeat(self) -> tuple[int, float] | None:
        """(pid, seconds since the runner's last beat), or None if it never beat."""
        path = f"{self._dir}/{HEARTBEAT}"
        try:
            with open(path) as f:
                pid = int(f.read().strip() or 0)
            return pid, time.time() - os.stat(path).st_mtime
        except (OSError, ValueError):
            return None

    def free_bytes(self) -> int:
        st = os.statvfs(self.dir)
        return st.f_bavail * st.f_frsize
