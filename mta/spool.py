"""The spool: each accepted message as two files in ``spool_dir``, durable before we say 250.

On-disk format, version 1:

- ``<id>.eml``  the message exactly as it will be delivered (our Received header first), CRLF.
- ``<id>.json`` the envelope, UTF-8 JSON::

    {"version": 1, "id": ..., "created": <unix time>, "mail_from": "a@b" or "",
     "smtputf8": bool, "body": "7BIT"|"8BITMIME", "size": int, "client": {"ip", "helo",
     "protocol", "auth"}, "dsn": {"ret": "FULL"|"HDRS"|null, "envid": str|null},
     "recipients": [{"address": final target, "original": RCPT address as given,
                     "orcpt": str|null, "notify": [..]|null, "status": "pending"|"sent"|
                     "failed"|"expired", "attempts": int, "next_attempt": <unix time>,
                     "last_reply": str, "last_relay": str, "delay_notified": bool,
                     "dsn_passed": bool}]}

Write order: the ``.eml`` is written and fsynced first, then the ``.json`` to a temporary name,
fsynced and renamed, then the directory is fsynced. The ``.json`` rename is the commit point:
at start-up an ``.eml`` without ``.json`` is a transaction that never got its 250 and is removed.
Only the queue runner rewrites ``.json`` files after that, under an flock on the ``.eml``, which
the ``pochta queue`` commands take too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store.fsio import atomic_write, ensure_dir, fsync_dir, wait_for_lock, write_file_synced

log = logging.getLogger("pochta.spool")

FORMAT_VERSION = 1
PENDING, SENT, FAILED, EXPIRED = "pending", "sent", "failed", "expired"
FINAL = {SENT, FAILED, EXPIRED}
GARBAGE_AGE = 3600.0  # seconds an uncommitted spool file must be idle before it is garbage
KICK = "kick"  # marker file: another process asks the runner to rescan
FLUSH = "flush"  # marker file: make every deferred recipient due now


class SpoolError(Exception):
    pass


# A message to spool: bytes, or pieces of it: bytes and (file, offset) meaning "that file from
# that offset to its end" (large messages arrive in a file and are copied by the kernel).
MessageParts = list["bytes | tuple[Path, int]"]


@dataclass
class Recipient:
    address: str
    original: str
    orcpt: str | None = None
    notify: list[str] | None = None
    status: str = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""
    last_relay: str = ""
    delay_notified: bool = False  # a "delayed" DSN went out for this recipient
    dsn_passed: bool = False  # the next hop took our NOTIFY: it reports success, not us


@dataclass
class Envelope:
    id: str
    created: float
    mail_from: str
    recipients: list[Recipient]
    size: int = 0
    smtputf8: bool = False
    body: str = "7BIT"
    client: dict[str, Any] = field(default_factory=dict)
    dsn: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status == "pending"]

    @property
    def finished(self) -> bool:
        return all(r.status in FINAL for r in self.recipients)

    def to_json(self) -> bytes:
        raw = dict(vars(self))
        raw["recipients"] = [vars(r) for r in self.recipients]
        return json.dumps(raw, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        raw = json.loads(data)
        if raw.get("version") != FORMAT_VERSION:
            raise SpoolError(f"unknown spool format version {raw.get('version')!r}")
        raw["recipients"] = [Recipient(**r) for r in raw["recipients"]]
        return cls(**raw)


def read_header_section(path: Path, limit: int = 1 << 20) -> bytes:
    """The header section of a message in a file, through the CRLF of its last field."""
    with open(path, "rb") as f:
        head = f.read(limit)
    end = head.find(b"\r\n\r\n")
    return head if end < 0 else head[: end + 2]


def write_parts_synced(path: Path, parts: MessageParts) -> int:
    """Create ``path`` from ``parts``, fsync it; return its size. Files are copied in-kernel."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    size = 0
    try:
        for part in parts:
            if isinstance(part, bytes):
                view = memoryview(part)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                size += len(part)
            else:
                src, offset = part
                with open(src, "rb") as f:
                    remaining = os.fstat(f.fileno()).st_size - offset
                    while remaining > 0:
                        n = os.sendfile(fd, f.fileno(), offset, min(remaining, 1 << 24))
                        if n == 0:
                            break
                        offset += n
                        remaining -= n
                        size += n
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    return size


def new_id() -> str:
    """Sortable by arrival (microseconds, hex) and unique (random suffix)."""
    return f"{time.time_ns() // 1000:014x}{secrets.token_hex(3)}"


class Spool:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = ensure_dir(directory, 0o700)
        # Group commit: messages whose DATA ends while a commit is running wait for the next
        # one and share its thread hop and directory fsync.
        self._waiting: list[tuple[Envelope, bytes | MessageParts, asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None

    async def commit(self, env: Envelope, message: bytes | MessageParts) -> None:
        """``put`` from the event loop, batched with concurrent callers (group commit)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((env, message, future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_batches())
        await future

    async def _commit_batches(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            errors = await asyncio.to_thread(self._put_batch, [(e, m) for e, m, _ in batch])
            for (_, _, future), error in zip(batch, errors, strict=True):
                if future.done():
                    continue
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    def _put_batch(self, items: list[tuple[Envelope, bytes | MessageParts]]
                   ) -> list[BaseException | None]:
        errors: list[BaseException | None] = []
        for env, message in items:
            try:
                self._write(env, message)
                errors.append(None)
            except OSError as e:
                errors.append(e)
        if any(e is None for e in errors):
            try:
                fsync_dir(self.dir)  # one directory sync makes the whole batch durable
            except OSError as e:
                for (env, _), err in zip(items, errors, strict=True):
                    if err is None:
                        self._discard(env.id)
                return [e] * len(items)
        return errors

    def eml_path(self, qid: str) -> Path:
        return self.dir / f"{qid}.eml"

    def json_path(self, qid: str) -> Path:
        return self.dir / f"{qid}.json"

    def put(self, env: Envelope, message: bytes | MessageParts) -> None:
        """Store a new message durably; when this returns, it survives a crash."""
        self._write(env, message)
        try:
            fsync_dir(self.dir)  # one directory sync makes both names durable
        except BaseException:
            self._discard(env.id)
            raise

    def _write(self, env: Envelope, message: bytes | MessageParts) -> None:
        """Both files written and fsynced; durable once the directory is fsynced."""
        try:
            if isinstance(message, bytes):
                env.size = len(message)
                write_file_synced(self.eml_path(env.id), message)
            else:
                env.size = write_parts_synced(self.eml_path(env.id), message)
            atomic_write(self.json_path(env.id), env.to_json(), sync_dir=False)
        except BaseException:
            self._discard(env.id)
            raise

    def _discard(self, qid: str) -> None:
        for p in (self.json_path(qid), self.eml_path(qid)):
            with contextlib.suppress(OSError):
                p.unlink()

    def update(self, env: Envelope) -> None:
        atomic_write(self.json_path(env.id), env.to_json())

    def remove(self, qid: str) -> None:
        # .json first: without it the .eml is garbage, never a message to deliver again. No
        # directory fsync (as Postfix): a crash may bring a delivered message back, which means
        # a duplicate, never a loss, and it saves an fsync per message.
        for p in (self.json_path(qid), self.eml_path(qid)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def message(self, qid: str, in_memory_max: int) -> bytes | Path:
        """The message's bytes, or its file when it is larger than ``in_memory_max``."""
        path = self.eml_path(qid)
        if path.stat().st_size > in_memory_max:
            return path
        return path.read_bytes()

    def load(self, qid: str) -> Envelope:
        return Envelope.from_json(self.json_path(qid).read_bytes())

    def ids(self) -> list[str]:
        return sorted(p.name[:-5] for p in self.dir.iterdir()
                      if p.name.endswith(".json") and not p.name.startswith("."))

    def collect_garbage(self, min_age: float = GARBAGE_AGE) -> int:
        """Remove uncommitted leftovers of a crash: temporary files, .eml without .json.

        Only files untouched for ``min_age`` seconds: the MSA (another process) and sessions
        receiving a large message write these files right now, and a transfer in progress
        touches its file at least every idle timeout.
        """
        names = {p.name for p in self.dir.iterdir()}
        cutoff = time.time() - min_age
        removed = 0
        for name in names:
            uncommitted = (name.startswith(".") and name.endswith(".tmp")) or (
                name.endswith(".eml") and f"{name[:-4]}.json" not in names)
            if not uncommitted:
                continue
            path = self.dir / name
            try:
                if path.stat().st_mtime > cutoff:
                    continue
                path.unlink()
                removed += 1
                log.info("removed uncommitted spool file %s", name)
            except FileNotFoundError:
                continue
        return removed

    def recover(self) -> list[Envelope]:
        """Every committed message; removes uncommitted leftovers of a crash."""
        self.collect_garbage()
        items = []
        for qid in self.ids():
            try:
                items.append(self.load(qid))
            except (OSError, ValueError, TypeError, SpoolError) as e:
                log.error("%s: unreadable envelope left in place: %s", qid, e)
        return items

    def try_lock(self, qid: str) -> int | None:
        """The item's lock without waiting: a descriptor to ``unlock``, or None if busy/gone."""
        try:
            fd = os.open(self.eml_path(qid), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def unlock(fd: int) -> None:
        os.close(fd)

    def checkout(self, qid: str, in_memory_max: int = 1 << 20
                 ) -> tuple[int, bytes | Path] | None:
        """Lock a committed item and get its message (``message``); None if busy or gone."""
        fd = self.try_lock(qid)
        if fd is None:
            return None
        try:
            if not self.json_path(qid).exists():
                os.close(fd)
                return None
            return fd, self.message(qid, in_memory_max)
        except BaseException:
            os.close(fd)
            raise

    def checkin(self, env: Envelope, fd: int) -> None:
        """Record an attempt's outcome (or remove a finished item) and release its lock."""
        try:
            if env.finished:
                self.remove(env.id)
            else:
                self.update(env)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def locked(self, qid: str, timeout: float = 30.0) -> Iterator[bool]:
        """Hold the item's lock; yields False if the item is gone (delivered or deleted)."""
        try:
            fd = os.open(self.eml_path(qid), os.O_RDONLY)
        except FileNotFoundError:
            yield False
            return
        try:
            if not wait_for_lock(fd, fcntl.flock, timeout, poll=0.05):
                raise SpoolError(f"queue item {qid} is busy")
            yield self.json_path(qid).exists()
        finally:
            os.close(fd)

    def touch_marker(self, name: str) -> None:
        p = self.dir / name
        p.touch()

    def take_marker(self, name: str) -> bool:
        try:
            (self.dir / name).unlink()
            return True
        except FileNotFoundError:
            return False

    def free_bytes(self) -> int:
        st = os.statvfs(self.dir)
        return st.f_bavail * st.f_frsize
