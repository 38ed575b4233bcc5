"""Group commit for the event loop: concurrent callers share one trip to a worker thread.

Callers that arrive while a batch runs wait for the next one, so under load every batch holds
what arrived during the previous one: one thread hop, and one round of fsyncs, for all of them.
The spool (MTA) and maildir delivery (MDA) both use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    def __init__(self, run_batch: Callable[[list[Item]], list[Result | BaseException]],
                 max_batch: int = 256) -> None:
        """``run_batch`` runs in a thread and returns one result (or exception) per item."""
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
                results = await asyncio.to_thread(self.run_batch, [item for item, _ in batch])
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
