"""Group commit for the event loop: concurrent callers share one round of fsyncs.

Callers that arrive while a batch runs wait for the next one, so under load every batch holds
what arrived during the previous one. The spool (MTA) and maildir delivery (MDA) both use it.

Why the batch functions keep the worker thread to the fsyncs alone: every system call a thread
makes gives up the GIL and must win it back from a busy event loop, which costs far more than
the call (measured: a batch of 23 spool writes took 38 ms at 50 sessions with the whole write
in the thread). Opening, writing to the page cache and renaming are quick enough for the loop.

``DiskSync`` keeps a lone message's fsyncs on the loop while the disk is fast: see there.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, ParamSpec, TypeVar

from store.fsio import (
    Unpublished,
    abandon,
    fsync_dirs,
    fsync_each,
    publish,
    retract,
    syncfs,
    syncfs_flushes,
)

Item = TypeVar("Item")
Result = TypeVar("Result")
P = ParamSpec("P")
T = TypeVar("T")


class DiskSync:
    """How a batch's files become durable, and where (event loop or worker thread).

    A trip to a worker thread and back costs more than a quick fsync: measured on this project's
    2-core VM, ``to_thread`` of a no-op takes 0.28 ms (two cross-CPU wake-ups and the GIL), an
    fsync of 4 KB 0.19 ms. For one message on a quiet server nothing else needs the loop, and
    while the disk answers fast (SSD, NVMe, a VM's disk) it does them (the measured average
    decides: a slow disk would stall the sessions). A batch means other sessions are busy: the
    loop goes on reading them while the thread syncs (50 sessions, 4 KB: p99 end-of-DATA 79 and
    67 ms against 93 and 83 ms with batches synced on the loop).

    A batch's files on the file system of ``anchor`` (the spool, the mailbox root) are made
    durable by one ``syncfs`` (and one fsync) instead of an fsync each, where the file system
    is one whose syncfs flushes: every fsync ends in a
    cache flush of the disk, which is what the disk is slowest at (on this VM, 20 new 4 KB
    files: 4.5-4.9 ms by parallel fsyncs, 1.7 ms by one syncfs). syncfs also writes whatever
    else is dirty on that file system, so it is used only while it measures faster than the
    fsyncs it replaces (tried again every ``RETRY`` batches): a neighbour writing gigabytes
    makes us fall back.
    """

    FAST = 0.002  # seconds per fsync (moving average) under which the loop does them
    PARALLEL = 8  # fsyncs of one batch in flight together when syncfs is not used
    RETRY = 64  # batches between two tries of a syncfs that measured slower than fsyncs
    SYNCFS_MIN = 3  # files: syncfs costs two flushes (see fsync_all)

    def __init__(self, anchor: str | None = None, use_syncfs: bool = True) -> None:
        """``anchor``: a directory on the file system whose batches may be synced by one syncfs
        (only where that flushes: ext4, xfs, btrfs; see store.fsio.SYNCFS_FLUSHES), unless
        ``use_syncfs`` is False (config ``sync_method = "fsync"``)."""
        self.average = 0.0005  # per fsync: a guess (an SSD's); the first calls measure the disk
        self.syncfs_average = 0.0  # per syncfs; 0 until measured
        self._anchor = anchor if use_syncfs else None
        self._anchor_fd: int | None = None
        self._anchor_dev = -2
        self._batches = 0
        self._pool: ThreadPoolExecutor | None = None

    def inline(self, items: int) -> bool:
        return items == 1 and self.average < self.FAST

    async def run(self, items: int, fsyncs: int, fn: Callable[P, T], *args: P.args,
                  **kwargs: P.kwargs) -> T:
        """``fn(*args)``, which makes ``fsyncs`` fsyncs for a batch of ``items`` messages,
        inline or in a worker thread."""
        def timed() -> T:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if fsyncs:
                    self._measured_fsyncs(time.perf_counter() - t0, fsyncs)
        if self.inline(items):
            return timed()
        return await asyncio.to_thread(timed)

    def _measured_fsyncs(self, seconds: float, count: int) -> None:
        self.average += (seconds / count - self.average) * 0.2

    def fsync_all(self, fds: Sequence[int]) -> list[OSError | None]:
        """Make the files behind ``fds`` durable (in a worker thread); the error of each.

        One syncfs for those on the anchor's file system while it pays; otherwise up to
        ``PARALLEL`` fsyncs in flight (the disk merges the flushes of concurrent fsyncs: 20
        new 4 KB files took 11.2 ms one after the other, 6-7 ms with 4-16 at once).
        """
        if len(fds) < self.SYNCFS_MIN:
            return self._fsyncs(fds)
        anchor = self._anchor_descriptor() if self._syncfs_pays(len(fds)) else None
        if anchor is None:
            return self._fsyncs(fds)
        errors: list[OSError | None] = [None] * len(fds)
        elsewhere = [i for i, fd in enumerate(fds) if _device(fd) != self._anchor_dev]
        t0 = time.perf_counter()
        try:
            syncfs(anchor)
            # On ext4 without a journal syncfs writes the inode tables after its cache flush
            # (fs/sync.c, ext4_write_inode): an fsync, which always flushes, covers them.
            os.fsync(anchor)
        except OSError as e:  # which file failed is not known: none of them is durable
            return [e] * len(fds)
        self.syncfs_average += (time.perf_counter() - t0 - self.syncfs_average) * 0.2
        for i, error in zip(elsewhere, self._fsyncs([fds[i] for i in elsewhere]), strict=True):
            errors[i] = error
        return errors

    def _syncfs_pays(self, files: int) -> bool:
        if self._anchor is None:
            return False
        self._batches += 1
        return (self.syncfs_average < files * self.average
                or self._batches % self.RETRY == 0)

    def _anchor_descriptor(self) -> int | None:
        if self._anchor_fd is None and self._anchor is not None:
            try:
                fd = os.open(self._anchor, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                return None  # not there (yet): fsyncs
            if not syncfs_flushes(fd):
                os.close(fd)
                self._anchor = None  # for good: fsyncs on this file system
                return None
            self._anchor_dev = os.fstat(fd).st_dev
            self._anchor_fd = fd
        return self._anchor_fd

    def _fsyncs(self, fds: Sequence[int]) -> list[OSError | None]:
        t0 = time.perf_counter()
        errors = (fsync_each(fds) if len(fds) < 2
                  else list(self._executor().map(_fsync, fds)))
        if fds:
            self._measured_fsyncs(time.perf_counter() - t0, len(fds))
        return errors

    def fsync_dirs(self, dirs: Sequence[str]) -> dict[str, OSError | None]:
        """``fsync_dirs`` with the directories fsynced in parallel (in a worker thread)."""
        if len(dirs) < 2:
            return fsync_dirs(dirs)
        return dict(zip(dirs, self._executor().map(_fsync_dir, dirs), strict=True))

    async def commit(self, files: list[Unpublished], items: int,
                     synced: list[OSError | None] | None = None) -> list[OSError | None]:
        """The files of a batch of ``items`` messages made durable under their final names
        (store/fsio.py): fsynced together (unless ``synced`` says how that went), renamed from
        the loop, each directory fsynced once; each file's error, or None."""
        try:
            if synced is None:
                synced = await self.run(items, 0, self.fsync_all, [f.fd for f in files])
        except BaseException:
            abandon(files)
            raise
        errors, renamed = publish(files, synced)
        if renamed:
            retract(files, errors, renamed,
                    await self.run(items, len(renamed), self.fsync_dirs, list(renamed)))
        return errors

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:  # threads only for a process that sees batches
            self._pool = ThreadPoolExecutor(self.PARALLEL, thread_name_prefix="fsync")
        return self._pool


class Batcher(Generic[Item, Result]):
    def __init__(self,
                 run_batch: Callable[[list[Item]], Awaitable[Sequence[Result | BaseException]]],
                 max_batch: int = 256) -> None:
        """``run_batch`` returns one result (or exception) per item, in order."""
        self.run_batch = run_batch
        self.max_batch = max_batch  # bounds the open files a batch may hold
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._waiting:
            batch = self._waiting[: self.max_batch]
            del self._waiting[: self.max_batch]
            try:
                results = await self.run_batch([item for item, _ in batch])
            except asyncio.CancelledError:
                for _, future in batch + self._waiting:
                    future.cancel()
                raise
            except Exception as e:  # the batch as a whole failed: so did each item
                results = [e] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue  # its session went away (timeout, disconnect)
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)


def _device(fd: int) -> int:
    try:
        return os.fstat(fd).st_dev
    except OSError:
        return -1  # its fsync will say what is wrong


def _fsync(fd: int) -> OSError | None:
    return fsync_each([fd])[0]


def _fsync_dir(path: str) -> OSError | None:
    return fsync_dirs([path])[path]
