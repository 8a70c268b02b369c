"""Limits on the expensive edges of authentication: password hashing and failed attempts.

- :class:`PasswordWorkers`: argon2id hashes and checks (64 MiB and tens of milliseconds each) run in a small
  thread pool of its own (``IOT_API_PASSWORD_HASH_WORKERS``) with a bounded number of waiting jobs
  (``IOT_API_PASSWORD_HASH_QUEUE``); past that, the request is shed at once with 503 and ``Retry-After``, so a
  login flood costs a fixed amount of memory and leaves the event loop's other requests alone.
- :class:`FailureLimiter`: failures counted per subject (an account, a client address) in fixed one-minute
  windows in Redis, shared by every replica; a subject at its limit gets 429 with ``Retry-After`` until the
  window turns. Like the request rate limit it fails open while Redis is down (the worker bound still holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from prometheus_client import Counter

from iot_api.cache import Cache
from iot_api.errors import RateLimited, Unavailable

T = TypeVar("T")
PASSWORD_JOBS = Counter(
    "iot_api_password_jobs_total", "Password hash jobs by outcome (run, or shed: queue full)", ["outcome"]
)
AUTH_LIMITED = Counter("iot_api_auth_limited_total", "Requests refused by a failure limit", ["limit"])

WINDOW_S = 60
PASSWORD_NICE = 10


def _lower_priority() -> None:
    """Run this worker thread (and the threads argon2 starts from it) at a lower CPU priority, so that
    a hashing flood slows logins rather than every other request (Linux: nice is per thread)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PASSWORD_NICE)


class PasswordWorkers:
    """A bounded executor: at most ``workers`` jobs run and ``queue`` wait; more are refused with 503."""

    def __init__(self, workers: int, queue: int) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="password", initializer=_lower_priority
        )
        self.capacity = workers + queue
        self.admitted = 0  # jobs submitted and not finished (running or waiting), counted in the loop

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a worker; 503 with ``Retry-After`` when ``capacity`` jobs are admitted.

        A job leaves the count when its thread is done with it (not when its caller goes away), so the
        bound holds even for requests that were cancelled mid-hash.
        """
        if self.admitted >= self.capacity:
            PASSWORD_JOBS.labels("shed").inc()
            raise Unavailable("too many password checks in progress; try again shortly", retry_after_s=1)
        loop = asyncio.get_running_loop()
        self.admitted += 1
        job: Future[T] = self._executor.submit(fn, *args)
        job.add_done_callback(lambda _: self._release_from(loop))
        PASSWORD_JOBS.labels("run").inc()
        return await asyncio.wrap_future(job)

    def _release(self) -> None:
        self.admitted -= 1

    def _release_from(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed while a hash was still running
            loop.call_soon_threadsafe(self._release)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class FailureLimiter:
    """Failures per subject and minute in Redis (``<namespace>fail:<kind>:<subject>:<window>``)."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def _key(self, kind: str, subject: str, window: int) -> str:
        return self.cache.key("fail", kind, subject, window)

    async def check(self, checks: Sequence[tuple[str, str, int]]) -> None:
        """Refuse a ``(kind, subject, limit)`` that has ``limit`` failures this minute (0: no limit)."""
        active = [c for c in checks if c[2] > 0]
        if not active:
            return
        now = time.time()
        window = int(now // WINDOW_S)
        keys = [self._key(kind, subject, window) for kind, subject, _ in active]
        # One GET per key (not MGET): on a Redis Cluster the keys live on different shards.
        counts: list[Any] | None = await self.cache.pipeline(lambda p: [p.get(key) for key in keys])
        if counts is None:
            return
        for (kind, _, limit), count in zip(active, counts, strict=True):
            if count is not None and int(count) >= limit:
                raise self.limited(kind, now)

    async def record(self, checks: Sequence[tuple[str, str, int]]) -> list[int]:
        """Count one failure for each subject; the counts this minute (empty while Redis is down)."""
        active = [c for c in checks if c[2] > 0]
        if not active:
            return []
        window = int(time.time() // WINDOW_S)
        keys = [self._key(kind, subject, window) for kind, subject, _ in active]

        def build(pipe: Any) -> None:
            for key in keys:
                pipe.incr(key)
                pipe.expire(key, WINDOW_S + 1)

        result = await self.cache.pipeline(build)
        return [] if result is None else [int(v) for v in result[::2]]

    @staticmethod
    def limited(kind: str, now: float | None = None) -> RateLimited:
        """The refusal of a subject at its limit of ``kind``, until the window turns."""
        AUTH_LIMITED.labels(kind).inc()
        now = time.time() if now is None else now
        return RateLimited(
            f"too many failed attempts ({kind}); try again later",
            retry_after_s=max(1, WINDOW_S - int(now % WINDOW_S)),
        )
