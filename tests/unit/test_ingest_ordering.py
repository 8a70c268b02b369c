"""Keyed lanes (the order of rule actions): one key strictly in order, other keys never held back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from iot_ingest.ordering import KeyedLanes


class Target:
    """A fake webhook receiver: records what starts and ends; a job named in ``held`` waits for release."""

    def __init__(self, *held: str) -> None:
        self.started: list[str] = []
        self.finished: list[str] = []
        self.gates = {name: asyncio.Event() for name in held}
        self.running = 0
        self.max_running = 0

    async def __call__(self, job: str) -> None:
        self.started.append(job)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await asyncio.sleep(0)  # a delivery awaits its network: other jobs may run meanwhile
            if job in self.gates:
                await self.gates[job].wait()
            if job.startswith("boom"):
                raise RuntimeError(job)
            self.finished.append(job)
        finally:
            self.running -= 1

    def release(self, job: str) -> None:
        self.gates[job].set()


async def settle(done: Callable[[], bool]) -> None:
    """Let the event loop run until ``done()`` (no clock involved: a bounded number of turns)."""
    for _ in range(1000):
        if done():
            return
        await asyncio.sleep(0)
    raise AssertionError("the lanes did not get there")


async def test_jobs_of_one_key_run_in_order_even_when_the_first_one_is_slow() -> None:
    target = Target("open-1")
    lanes: KeyedLanes[str, str] = KeyedLanes(target, concurrency=4, capacity=10)
    assert lanes.submit("alert-1", "open-1")
    assert lanes.submit("alert-1", "resolve-1")
    await settle(lambda: target.started == ["open-1"])
    # The open is being retried (held): the resolve of the same alert waits, with free slots around.
    for _ in range(20):
        await asyncio.sleep(0)
    assert target.started == ["open-1"]
    assert lanes.waiting == 1
    target.release("open-1")
    await settle(lambda: target.finished == ["open-1", "resolve-1"])
    assert target.started == ["open-1", "resolve-1"]
    assert target.max_running == 1
    await settle(lambda: lanes.busy_keys == 0)


async def test_a_held_key_never_holds_back_another_key() -> None:
    target = Target("open-1")
    lanes: KeyedLanes[str, str] = KeyedLanes(target, concurrency=2, capacity=10)
    lanes.submit("alert-1", "open-1")
    lanes.submit("alert-1", "resolve-1")
    lanes.submit("alert-2", "open-2")
    lanes.submit("alert-2", "resolve-2")
    await settle(lambda: target.finished == ["open-2", "resolve-2"])
    assert "resolve-1" not in target.started
    target.release("open-1")
    await settle(lambda: target.finished[2:] == ["open-1", "resolve-1"])


async def test_waiting_in_before_takes_no_slot_from_other_keys() -> None:
    target = Target()
    earlier_done = asyncio.Event()
    waited: list[str] = []

    async def before(job: str) -> None:
        # resolve-1's open is delivered by another replica: wait for it, outside the slots.
        if job == "resolve-1":
            waited.append(job)
            await earlier_done.wait()

    lanes: KeyedLanes[str, str] = KeyedLanes(target, concurrency=1, capacity=10, before=before)
    lanes.submit("alert-1", "resolve-1")
    lanes.submit("alert-1", "open-2")
    lanes.submit("alert-3", "open-3")
    await settle(lambda: target.finished == ["open-3"])
    assert waited == ["resolve-1"]
    assert lanes.waiting == 2
    earlier_done.set()
    await settle(lambda: target.finished == ["open-3", "resolve-1", "open-2"])


async def test_a_job_that_fails_does_not_stop_its_key() -> None:
    target = Target()
    failing_before: list[str] = []

    async def before(job: str) -> None:
        if job == "bad-before":
            failing_before.append(job)
            raise ConnectionError("database unreachable")

    lanes: KeyedLanes[str, str] = KeyedLanes(target, concurrency=2, capacity=10, before=before)
    for job in ("boom-1", "bad-before", "resolve-1"):
        lanes.submit("alert-1", job)
    await settle(lambda: target.finished == ["resolve-1"])
    assert target.started == ["boom-1", "resolve-1"]
    assert failing_before == ["bad-before"]
    await settle(lambda: lanes.busy_keys == 0 and lanes.waiting == 0)


async def test_no_more_than_concurrency_jobs_run_and_no_more_than_capacity_wait() -> None:
    target = Target(*(f"open-{i}" for i in range(5)))
    lanes: KeyedLanes[str, str] = KeyedLanes(target, concurrency=2, capacity=5)
    assert all(lanes.submit(f"alert-{i}", f"open-{i}") for i in range(5))
    assert not lanes.submit("alert-9", "open-9")
    await settle(lambda: len(target.started) == 2)
    assert lanes.waiting == 3
    assert lanes.submit("alert-9", "open-9")
    assert lanes.submit("alert-9", "resolve-9")
    assert not lanes.submit("alert-10", "open-10")
    for i in range(5):
        target.release(f"open-{i}")
    await settle(lambda: len(target.finished) == 7)
    assert target.max_running == 2
    assert target.finished.index("open-9") < target.finished.index("resolve-9")


async def test_closing_cancels_what_has_not_run() -> None:
    target = Target("open-1")
    lanes: KeyedLanes[str, str] = KeyedLanes(target, concurrency=1, capacity=10)
    lanes.submit("alert-1", "open-1")
    lanes.submit("alert-1", "resolve-1")
    lanes.submit("alert-2", "open-2")
    await settle(lambda: target.started == ["open-1"])
    assert await lanes.aclose() == ["resolve-1", "open-2"]
    assert (lanes.waiting, lanes.busy_keys) == (0, 0)
    assert target.finished == []


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_many_alerts_each_in_order(concurrency: int) -> None:
    target = Target()
    lanes: KeyedLanes[int, str] = KeyedLanes(target, concurrency=concurrency, capacity=1000)
    for step in ("open", "resolve", "open-again"):
        for alert in range(50):
            assert lanes.submit(alert, f"{alert}:{step}")
    await settle(lambda: len(target.finished) == 150)
    for alert in range(50):
        mine = [job for job in target.finished if job.startswith(f"{alert}:")]
        assert mine == [f"{alert}:open", f"{alert}:resolve", f"{alert}:open-again"]
    assert target.max_running == concurrency
