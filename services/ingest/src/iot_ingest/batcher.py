"""Group commit: items wait in a batch that is flushed at a size limit or a time limit, whichever first.

Flushes run one at a time: the next batch fills while one is written, which makes batches grow with load
by themselves, and keeps commits in arrival order. With ``max_delay`` 0 (the ingest default) that is the
whole rule, adaptive batching: a batch is flushed as soon as the previous flush is done (up to
``max_size`` items), so an item arriving at an idle batcher is flushed at once (after the items already
received with it in the same turn of the event loop), and under load each batch holds what arrived
during the previous flush. A positive ``max_delay`` makes a batch also wait up to that long after its
first item for more: fewer, larger commits, at the price of that delay at low rates.

A flush may return a *release* future: the batch's submitters are then answered when it finishes, while
the next batch is already being flushed (ingest acknowledges a message only once its event is published,
without making the next commit wait for Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
Flush = Callable[[list[T]], Awaitable["asyncio.Future[None] | None"]]


class BatcherClosed(RuntimeError):
    """The batcher is draining or closed and takes no new items."""


class Batcher(Generic[T]):
    """Collects items and hands them to ``flush`` in batches; :meth:`submit` returns once flushed.

    ``flush`` must not return before the batch is durable (it retries by itself); when it raises, every
    submitter of that batch gets the exception. When it returns a future, submitters wait for that too.
    """

    def __init__(self, flush: Flush[T], *, max_size: int, max_delay: float) -> None:
        if max_size < 1 or max_delay < 0:
            raise ValueError("max_size must be at least 1 and max_delay not negative")
        self._flush = flush
        self.max_size = max_size
        self.max_delay = max_delay
        self._items: list[T] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._first_at = 0.0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Items waiting for a flush to start."""
        return len(self._items)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="batcher")

    def submit_nowait(self, item: T) -> asyncio.Future[None]:
        """Queue ``item``; the future resolves when its batch is flushed."""
        if self._closing:
            raise BatcherClosed("not taking new items")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._items:
            self._first_at = time.monotonic()
        self._items.append(item)
        self._waiters.append(future)
        if len(self._items) == 1 or len(self._items) >= self.max_size:
            self._wakeup.set()
        return future

    async def submit(self, item: T) -> None:
        await self.submit_nowait(item)

    async def close(self) -> None:
        """Take no new items, flush what is queued, and return when the last flush is done."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    def abort(self) -> None:
        """Stop at once: queued items are failed with :class:`BatcherClosed` (they were never flushed)."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
        for future in self._waiters:
            if not future.done():
                future.set_exception(BatcherClosed("aborted before the flush"))
        self._items, self._waiters = [], []

    async def _run(self) -> None:
        while True:
            if not self._items:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            delay = self._first_at + self.max_delay - time.monotonic()
            if len(self._items) < self.max_size and not self._closing and delay > 0:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), delay)
                continue
            await self._flush_some()

    async def _flush_some(self) -> None:
        items, waiters = self._items[: self.max_size], self._waiters[: self.max_size]
        del self._items[: self.max_size], self._waiters[: self.max_size]
        # Items left over are already older than this flush: they go out next, without waiting again.
        self._first_at = 0.0
        try:
            release = await self._flush(items)
        except asyncio.CancelledError:
            for future in waiters:
                future.cancel()
            raise
        except Exception as exc:
            for future in waiters:
                if not future.done():
                    future.set_exception(exc)
        else:
            if release is None or release.done():
                _answer(waiters)
            else:
                release.add_done_callback(lambda _: _answer(waiters))


def _answer(waiters: list[asyncio.Future[None]]) -> None:
    """The batch is durable: its submitters return (whatever became of the release step)."""
    for future in waiters:
        if not future.done():
            future.set_result(None)
