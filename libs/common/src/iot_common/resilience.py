"""Retrying and repeating, the same way in every service: exponential backoff, retries, periodic jobs.

- :class:`Backoff`: the delays between attempts (doubling, capped, optionally jittered). A reconnect loop
  asks it for the next delay and resets it once connected; gmqtt's own reconnect delay comes from it too.
- :func:`retry`: run one operation until it succeeds (tenacity, with a :class:`Backoff` as its wait, as
  :mod:`iot_common.startup` waits for the backends).
- :func:`run_periodic`: a background job every ``interval_s`` that never dies of a failure and logs one
  line per run of failures, not one per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_never

T = TypeVar("T")
Logger = structlog.stdlib.BoundLogger


class Backoff:
    """Delays that start at ``initial_s`` and grow by ``factor`` up to ``max_s``, each scaled by a random
    factor in ``1 ± jitter`` (so that many clients do not retry in step).

    :meth:`next` walks the delays of one run of failures and :meth:`reset` starts again after a success;
    :meth:`delay` gives the delay after a numbered attempt. An instance is also a tenacity wait strategy.
    """

    def __init__(
        self, initial_s: float, max_s: float = math.inf, *, factor: float = 2.0, jitter: float = 0.0
    ) -> None:
        if initial_s < 0 or max_s < initial_s or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("need 0 <= initial_s <= max_s, factor >= 1 and 0 <= jitter < 1")
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self.jitter = jitter
        self._failures = 0

    def delay(self, attempt: int) -> float:
        """The delay after failed attempt number ``attempt`` (1 for the first)."""
        try:
            base = self.initial_s * self.factor ** (attempt - 1)
        except OverflowError:
            base = math.inf
        if self.jitter:
            base *= random.uniform(1 - self.jitter, 1 + self.jitter)
        return min(base, self.max_s)

    def longest(self, attempt: int) -> float:
        """The longest delay :meth:`delay` can give after failed attempt number ``attempt``."""
        try:
            base = self.initial_s * self.factor ** (attempt - 1) * (1 + self.jitter)
        except OverflowError:
            base = math.inf
        return min(base, self.max_s)

    def next(self) -> float:
        """The delay after one more failure of the current run."""
        self._failures += 1
        return self.delay(self._failures)

    def reset(self) -> None:
        """A success: the next failure waits ``initial_s`` again."""
        self._failures = 0

    def __call__(self, state: RetryCallState) -> float:
        return self.delay(state.attempt_number)


class Stopped(Exception):
    """The stop event was set while :func:`retry` waited for the next attempt."""


async def retry(
    operation: Callable[[], Awaitable[T]],
    backoff: Backoff,
    *,
    retry_on: Callable[[Exception], bool] = lambda _: True,
    on_retry: Callable[[Exception, float], None] | None = None,
    attempts: int | None = None,
    stop: asyncio.Event | None = None,
) -> T:
    """Await ``operation()`` until it returns; after each exception ``retry_on`` accepts, call
    ``on_retry(exc, delay)`` (log, count) and wait ``delay`` from ``backoff``.

    Raises the last exception when ``retry_on`` refuses it or after ``attempts`` attempts (no limit by
    default), and :class:`Stopped` (without a further attempt) when ``stop`` is set.

    The first attempt is awaited directly; tenacity takes over only after a failure. Its state for one
    call is a knot of reference cycles (the retrying object, its per-thread statistics, its actions)
    that holds the operation, and whatever the operation holds, until the cycle collector finds it:
    ingest retries every batch this way, and at 1,000 msg/s that garbage made each of ingest's
    collections take 60-95 ms, every 3 s, stalling every message meanwhile (docs/performance.md).
    """
    if stop is not None and stop.is_set():
        raise Stopped
    try:
        return await operation()
    except Exception as exc:
        if (attempts is not None and attempts <= 1) or not retry_on(exc):
            raise
        first_failure = exc

    async def pause(delay: float) -> None:
        if stop is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            raise Stopped

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None and state.next_action is not None:
            error = state.outcome.exception()
            assert isinstance(error, Exception)
            on_retry(error, state.next_action.sleep)

    async def attempt() -> T:
        # tenacity awaits only coroutine functions; ``operation`` may be a lambda returning an awaitable.
        return await operation()

    delay = backoff.delay(1)
    if on_retry is not None:
        on_retry(first_failure, delay)
    await pause(delay)
    # Tenacity numbers its attempts from 1 again: its attempt n is this call's attempt n + 1.
    retrying = AsyncRetrying(
        sleep=pause,
        wait=lambda state: backoff.delay(state.attempt_number + 1),
        retry=retry_if_exception(lambda exc: isinstance(exc, Exception) and retry_on(exc)),
        stop=stop_never if attempts is None else stop_after_attempt(attempts - 1),
        before_sleep=before_sleep,
        reraise=True,
    )
    return await retrying(attempt)


async def run_periodic(
    name: str,
    interval_s: float,
    job: Callable[[], Awaitable[object]],
    *,
    log: Logger,
    run_first: bool = False,
) -> NoReturn:
    """Run ``job`` every ``interval_s`` (after the previous run ends) until cancelled.

    The first run is at once with ``run_first``, else after ``interval_s``. An exception never ends the
    loop: the first failure of a run of failures logs ``"{name} failed"`` (a warning), the next success
    ``"{name} recovered"`` with the number of failed runs; the failures between are not logged again.
    """
    failures = 0
    if not run_first:
        await asyncio.sleep(interval_s)
    while True:
        try:
            await job()
        except Exception as exc:
            failures += 1
            if failures == 1:
                log.warning(f"{name} failed", error=f"{type(exc).__name__}: {exc}"[:500])
        else:
            if failures:
                log.info(f"{name} recovered", failed_runs=failures)
            failures = 0
        await asyncio.sleep(interval_s)
