"""Keyed lanes: jobs of one key run one after another in submission order, different keys in parallel.

The action runner keys its jobs by rule and device, so that an alert's ``resolve`` action never starts
before its ``open`` action has finished (succeeded or given up), while a slow or retried action of one
alert holds back no other alert. Pure asyncio, no I/O: the unit tests drive it with small fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import structlog

K = TypeVar("K", bound=Hashable)
J = TypeVar("J")

log = structlog.stdlib.get_logger(__name__)


class KeyedLanes(Generic[K, J]):
    """Runs jobs on at most ``concurrency`` at once; the jobs of one key strictly one after another.

    Each key with work has its own lane (a task and a FIFO). A lane first awaits ``before(job)``
    outside the concurrency limit (waiting there takes no slot from other keys), then ``run(job)``
    inside it; the next job of the key starts only when ``run`` has returned or raised. At most
    ``capacity`` jobs wait (not yet started); :meth:`submit` refuses more.
    """

    def __init__(
        self,
        run: Callable[[J], Awaitable[object]],
        *,
        concurrency: int,
        capacity: int,
        before: Callable[[J], Awaitable[object]] | None = None,
    ) -> None:
        self._run = run
        self._before = before
        self._slots = asyncio.Semaphore(concurrency)
        self._capacity = capacity
        self._lanes: dict[K, deque[J]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Jobs submitted and not started yet."""
        return self._waiting

    @property
    def busy_keys(self) -> int:
        """Keys with a job waiting or running."""
        return len(self._lanes)

    def submit(self, key: K, job: J) -> bool:
        """Queue ``job`` behind the other jobs of ``key``; False when ``capacity`` jobs already wait."""
        if self._waiting >= self._capacity:
            return False
        self._waiting += 1
        lane = self._lanes.get(key)
        if lane is not None:
            lane.append(job)
            return True
        self._lanes[key] = deque([job])
        task = asyncio.get_running_loop().create_task(self._drain(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _drain(self, key: K) -> None:
        lane = self._lanes[key]
        try:
            while lane:
                job = lane[0]
                started = False
                try:
                    if self._before is not None:
                        await self._before(job)
                    async with self._slots:
                        lane.popleft()
                        self._waiting -= 1
                        started = True
                        await self._run(job)
                except Exception:
                    log.exception("keyed job failed", key=str(key))
                    if not started:
                        lane.popleft()
                        self._waiting -= 1
        finally:
            # Cancelled: the jobs left in the lane are not run.
            self._waiting -= len(lane)
            del self._lanes[key]

    async def aclose(self) -> list[J]:
        """Cancel every lane; returns the jobs that had not started (they are not run)."""
        left = [job for lane in self._lanes.values() for job in lane]
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        return left
