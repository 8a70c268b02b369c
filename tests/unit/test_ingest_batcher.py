"""The ingest batcher: flush at the size limit or the time limit, in order, one flush at a time."""

from __future__ import annotations

import asyncio

import pytest

from iot_ingest.batcher import Batcher, BatcherClosed


class Recorder:
    """A flush that records batches and can be held, to see what piles up meanwhile."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.started = asyncio.Event()
        """Set when a flush begins."""
        self.running = 0
        self.max_running = 0

    async def __call__(self, items: list[int]) -> None:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.started.set()
        try:
            await self.release.wait()
            self.batches.append(items)
        finally:
            self.running -= 1


async def test_a_full_batch_is_flushed_without_waiting_for_the_delay() -> None:
    flush = Recorder()
    batcher: Batcher[int] = Batcher(flush, max_size=3, max_delay=3600)
    batcher.start()
    await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(3))), 5)
    assert flush.batches == [[0, 1, 2]]
    await batcher.close()


async def test_a_partial_batch_is_flushed_after_the_delay() -> None:
    flush = Recorder()
    batcher: Batcher[int] = Batcher(flush, max_size=100, max_delay=0.02)
    batcher.start()
    await asyncio.wait_for(asyncio.gather(batcher.submit(1), batcher.submit(2)), 5)
    assert flush.batches == [[1, 2]]
    await batcher.close()


async def test_without_a_delay_an_idle_batcher_flushes_at_once_what_arrived_in_the_same_turn() -> None:
    flush = Recorder()
    batcher: Batcher[int] = Batcher(flush, max_size=100, max_delay=0)
    batcher.start()
    # Submitted in one turn of the event loop (as gmqtt hands over the messages of one socket read): one
    # batch, flushed without any timer.
    futures = [batcher.submit_nowait(i) for i in range(3)]
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert flush.batches == [[0, 1, 2]]
    assert loop.time() - began < 0.5
    await batcher.close()


async def test_items_arriving_during_a_flush_form_the_next_batches_in_order() -> None:
    flush = Recorder()
    flush.release.clear()
    batcher: Batcher[int] = Batcher(flush, max_size=4, max_delay=0)
    batcher.start()
    first = batcher.submit_nowait(0)
    await asyncio.wait_for(flush.started.wait(), 5)
    assert flush.running == 1
    rest = [batcher.submit_nowait(i) for i in range(1, 10)]
    assert batcher.pending == 9
    flush.release.set()
    await asyncio.wait_for(asyncio.gather(first, *rest), 5)
    assert flush.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert flush.max_running == 1
    await batcher.close()


async def test_a_failed_flush_fails_its_submitters_only() -> None:
    calls = 0

    async def flaky(items: list[int]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")

    batcher: Batcher[int] = Batcher(flaky, max_size=2, max_delay=0)
    batcher.start()
    a, b = batcher.submit_nowait(1), batcher.submit_nowait(2)
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(a, 5)
    with pytest.raises(RuntimeError):
        await b
    await asyncio.wait_for(batcher.submit(3), 5)
    await batcher.close()


async def test_close_flushes_what_is_queued_and_refuses_new_items() -> None:
    flush = Recorder()
    batcher: Batcher[int] = Batcher(flush, max_size=100, max_delay=3600)
    batcher.start()
    waiting = [batcher.submit_nowait(i) for i in range(5)]
    await asyncio.wait_for(batcher.close(), 5)
    assert flush.batches == [[0, 1, 2, 3, 4]]
    assert all(f.done() and f.exception() is None for f in waiting)
    with pytest.raises(BatcherClosed):
        batcher.submit_nowait(6)


async def test_abort_fails_what_was_never_flushed() -> None:
    flush = Recorder()
    flush.release.clear()
    batcher: Batcher[int] = Batcher(flush, max_size=1, max_delay=0)
    batcher.start()
    in_flush = batcher.submit_nowait(1)
    await asyncio.wait_for(flush.started.wait(), 5)
    queued = batcher.submit_nowait(2)
    batcher.abort()
    with pytest.raises(BatcherClosed):
        await queued
    with pytest.raises(asyncio.CancelledError):
        await in_flush


async def test_submitters_wait_for_the_release_step_while_the_next_batch_flushes() -> None:
    """A flush that returns a future (ingest's Redis step) answers its batch when that is done; meanwhile
    the next batch is already flushed."""
    flushed: list[list[int]] = []
    releases: list[asyncio.Future[None]] = []
    both_flushed = asyncio.Event()

    async def flush(items: list[int]) -> asyncio.Future[None]:
        flushed.append(items)
        releases.append(asyncio.get_running_loop().create_future())
        if len(flushed) == 2:
            both_flushed.set()
        return releases[-1]

    batcher: Batcher[int] = Batcher(flush, max_size=2, max_delay=3600)
    batcher.start()
    first = [asyncio.ensure_future(batcher.submit(i)) for i in range(2)]
    second = [asyncio.ensure_future(batcher.submit(i)) for i in range(2, 4)]
    await asyncio.wait_for(both_flushed.wait(), 5)
    assert flushed == [[0, 1], [2, 3]]
    assert not any(f.done() for f in first + second)
    releases[1].set_result(None)
    await asyncio.wait_for(asyncio.gather(*second), 5)
    assert not any(f.done() for f in first)
    releases[0].set_exception(RuntimeError("redis down"))
    await asyncio.wait_for(asyncio.gather(*first), 5)
    await batcher.close()
