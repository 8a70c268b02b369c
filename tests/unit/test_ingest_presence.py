"""The "device came online" hooks (iot_ingest.presence.Presence): run after the batch's Redis step, batch
after batch, every hook even when one raises; ``drain`` waits for them. The queue flush itself runs
against PostgreSQL in tests/integration/test_command_queue.py."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from structlog.testing import capture_logs

from iot_ingest import metrics
from iot_ingest.plan import Plan
from iot_ingest.presence import Presence


async def test_hooks_run_in_order_after_the_redis_step_and_batch_after_batch() -> None:
    calls: list[tuple[str, list[str]]] = []
    release = asyncio.Event()

    async def slow(devices: Sequence[str]) -> None:
        if devices == ["a"]:
            await release.wait()
        calls.append(("slow", list(devices)))

    async def second(devices: Sequence[str]) -> None:
        calls.append(("second", list(devices)))

    presence = Presence([slow, second])
    redis_step = asyncio.ensure_future(release.wait())
    presence.submit(["a"], redis_step)
    presence.submit(["b", "c"])
    for _ in range(20):  # let every ready task run: none may call a hook yet
        await asyncio.sleep(0)
    assert calls == []  # the first batch waits for its Redis step, the second for the first
    release.set()
    await asyncio.wait_for(presence.drain(), 5)
    assert calls == [("slow", ["a"]), ("second", ["a"]), ("slow", ["b", "c"]), ("second", ["b", "c"])]


async def test_a_hook_that_raises_is_logged_and_counted_and_the_next_hooks_run() -> None:
    seen: list[str] = []

    async def broken(devices: Sequence[str]) -> None:
        raise RuntimeError("boom")

    async def fine(devices: Sequence[str]) -> None:
        seen.extend(devices)

    before = metrics.ONLINE_HOOK_ERRORS.labels("broken")._value.get()
    presence = Presence([broken, fine])
    with capture_logs() as logs:
        presence.submit(["d1"])
        presence.submit(["d2"])
        await asyncio.wait_for(presence.drain(), 5)
    assert seen == ["d1", "d2"]
    assert metrics.ONLINE_HOOK_ERRORS.labels("broken")._value.get() == before + 2
    failed = [e for e in logs if e["event"] == "device online hook failed"]
    assert [(e["hook"], e["devices"]) for e in failed] == [("broken", ["d1"]), ("broken", ["d2"])]


async def test_nothing_runs_for_a_batch_without_devices_that_came_online() -> None:
    calls: list[Sequence[str]] = []

    async def hook(devices: Sequence[str]) -> None:
        calls.append(devices)

    presence = Presence([hook])
    presence.submit([])
    await presence.drain()
    assert calls == []


def test_merged_plans_keep_each_device_that_came_online_once() -> None:
    plan = Plan(came_online=["a", "b"])
    plan.merge(Plan(came_online=["b", "c"]))
    assert plan.came_online == ["a", "b", "c"]
