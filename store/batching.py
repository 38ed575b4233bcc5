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
from collections.abc import Awaitable, Callable
from typing import Generic, ParamSpec, TypeVar

from store.fsio import fsync_dir

Item = TypeVar("Item")
Result = TypeVar("Result")
P = ParamSpec("P")
T = TypeVar("T")


class DiskSync:
    """Runs a lone message's fsyncs on the event loop while they are quick, a batch's in a
    worker thread.

    A trip to a worker thread and back costs more than a quick fsync: measured on this project's
    2-core VM, ``to_thread`` of a no-op takes 0.28 ms (two cross-CPU wake-ups and the GIL), an
    fsync of 4 KB 0.19 ms. For one message on a quiet server nothing else needs the loop, and
    while the disk answers fast (SSD, NVMe, a VM's disk) it does them (the measured average
    decides: a slow disk would stall the sessions). A batch means other sessions are busy: the
    loop goes on reading them while the thread syncs (50 sessions, 4 KB: p99 end-of-DATA 79 and
    67 ms against 93 and 83 ms with batches synced on the loop).
    """

    FAST = 0.002  # seconds per fsync (moving average) under which the loop does them

    def __init__(self) -> None:
        self.average = 0.0005  # a guess (an SSD's); the first calls measure the disk

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
                    per = (time.perf_counter() - t0) / fsyncs
                    self.average += (per - self.average) * 0.2
        if self.inline(items):
            return timed()
        return await asyncio.to_thread(timed)


class Batcher(Generic[Item, Result]):
    def __init__(self, run_batch: Callable[[list[Item]], Awaitable[list[Result | BaseException]]],
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


def fsync_all(fds: list[int]) -> list[OSError | None]:
    """fsync each descriptor (in a worker thread); the error of each, or None."""
    errors: list[OSError | None] = []
    for fd in fds:
        try:
            os.fsync(fd)
            errors.append(None)
        except OSError as e:
            errors.append(e)
    return errors


def fsync_dirs(dirs: list[str]) -> dict[str, OSError | None]:
    """fsync each directory once (in a worker thread); the error of each, or None."""
    errors: dict[str, OSError | None] = {}
    for d in dirs:
        try:
            fsync_dir(d)
            errors[d] = None
        except OSError as e:
            errors[d] = e
    return errors
