"""Waiting until a condition holds, within a deadline: the one poll loop of the tests and benchmarks.

For state that no event announces (a row in PostgreSQL, a metric of another process, a port that starts
listening). Where an event can be awaited (a SUBACK, a frame, a future), await it instead.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold in time; an AssertionError, so a test reports it as a failed check."""


def _timed_out(timeout: float, what: str, detail: Callable[[], str] | None) -> WaitTimeout:
    message = f"timed out after {timeout}s waiting for {what}"
    return WaitTimeout(f"{message}:\n{detail()}" if detail is not None else message)


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> T:
    """Call ``predicate`` every ``interval`` s until it returns something true, and return that; raise
    :class:`WaitTimeout` (with ``detail()`` appended, e.g. a process log) after ``timeout`` s. An exception
    from ``predicate`` (a process that exited, say) ends the wait at once."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what, detail)
        time.sleep(interval)


async def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    interval: float = 0.1,
    detail: Callable[[], str] | None = None,
) -> Any:
    """:func:`wait_until` without blocking the event loop; ``predicate`` may be a plain function or a
    coroutine function (its result is awaited). Returns the first true result."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what, detail)
        await asyncio.sleep(interval)
