"""Tenants' readings limits: which messages of a batch are admitted, and one count for every replica.

The counter is a small in-memory stand-in for Redis's INCRBY/EXPIRE; the same paths against the real
services: tests/e2e/test_tenants.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.exceptions
from structlog.testing import capture_logs

from iot_common.messages import Reading
from iot_common.topics import RedisNames
from iot_ingest import metrics
from iot_ingest.devices import KnownDevices, TenantLimits
from iot_ingest.payload import Reject
from iot_ingest.plan import Delivery, plan_batch
from iot_ingest.tenant_quota import RETRY_AFTER_S, TenantQuota, admit, demand

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
NAMES = RedisNames("unit")
ACME, GLOBEX, FREE = "a" * 8, "b" * 8, "c" * 8
LIMITS = {
    ACME: TenantLimits("acme", max_readings_per_s=10),
    GLOBEX: TenantLimits("globex", max_readings_per_s=3),
    FREE: TenantLimits("free"),
}
TENANTS = {"a1": ACME, "a2": ACME, "g1": GLOBEX, "f1": FREE}


def message(device_id: str, readings: int, *rejects: Reject) -> Delivery:
    batch = [Reading(device_id, T0, {"t": float(i)}) for i in range(readings)]
    topic = f"devices/telemetry/{device_id}"
    return Delivery(topic, device_id, T0, b"[...]", readings=batch, rejects=list(rejects))


def outcome(batch: list[Delivery]) -> list[tuple[str | None, int, list[str]]]:
    """(device, readings kept, reject reasons) of each message."""
    return [(d.device_id, len(d.readings), [r.reason for r in d.rejects]) for d in batch]


def test_demand_counts_the_readings_of_tenants_with_a_limit_only() -> None:
    status = Delivery("devices/status/a1", "a1", T0, b"online", status="online")
    batch = [message("a1", 4), message("a2", 2), message("g1", 1), message("f1", 50), message("x", 9), status]
    assert demand(batch, TENANTS, LIMITS) == {ACME: 6, GLOBEX: 1}
    assert demand([message("f1", 5), status], TENANTS, LIMITS) == {}


def test_messages_are_admitted_in_order_while_they_fit_and_refused_whole_past_the_limit() -> None:
    batch = [message("a1", 4), message("a2", 5), message("a1", 3), message("a1", 2), message("f1", 100)]
    # acme used 2 of its 10 readings this second before the batch: 8 left.
    admitted = admit(batch, TENANTS, LIMITS, {ACME: 2})
    assert outcome(admitted) == [
        ("a1", 4, []),
        ("a2", 0, ["tenant_quota"]),  # 5 > 4 left: refused whole, not cut
        ("a1", 3, []),  # a later, smaller message still fits
        ("a1", 0, ["tenant_quota"]),
        ("f1", 100, []),  # a tenant without a limit is not touched
    ]
    assert admitted[1].rejects[0].detail == (
        "tenant 'acme' over its limit of 10 readings/s: message of 5 readings, 4 left in this second"
    )
    assert admitted[3].rejects[0].detail.endswith("message of 2 readings, 1 left in this second")


def test_a_refused_message_keeps_its_own_rejects_and_its_dead_letters_go_to_its_tenant() -> None:
    bad_element = Reject("invalid_value", "[1] t: null")
    [refused] = admit([message("g1", 4, bad_element)], TENANTS, LIMITS, {GLOBEX: 0})
    assert outcome([refused]) == [("g1", 0, ["invalid_value", "tenant_quota"])]
    plan = plan_batch([refused], {}, TENANTS)
    assert plan.readings == []
    assert [(d.reason, d.tenant_id, d.device_id) for d in plan.dead_letters] == [
        ("invalid_value", GLOBEX, "g1"),
        ("tenant_quota", GLOBEX, "g1"),
    ]


def test_a_tenant_already_over_its_limit_gets_nothing_stored() -> None:
    admitted = admit([message("g1", 1), message("a1", 1)], TENANTS, LIMITS, {GLOBEX: 7, ACME: 0})
    assert outcome(admitted) == [("g1", 0, ["tenant_quota"]), ("a1", 1, [])]
    assert admitted[0].rejects[0].detail.endswith("message of 1 reading, 0 left in this second")


class FakeCounters:
    """Redis as the quota uses it: INCRBY and EXPIRE on a pipeline; ``down`` makes every call fail."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.ttls: dict[str, int] = {}
        self.pipelines = 0
        self.down = False

    @asynccontextmanager
    async def pipeline(self, transaction: bool = True) -> AsyncIterator[FakePipeline]:
        yield FakePipeline(self)


class FakePipeline:
    def __init__(self, server: FakeCounters) -> None:
        self.server = server
        self.commands: list[tuple[str, str, int]] = []

    def incrby(self, key: str, amount: int) -> None:
        self.commands.append(("incrby", key, amount))

    def expire(self, key: str, seconds: int) -> None:
        self.commands.append(("expire", key, seconds))

    async def execute(self) -> list[Any]:
        server = self.server
        if server.down:
            raise redis.exceptions.ConnectionError("Error 111 connecting to redis:6379. Connection refused.")
        server.pipelines += 1
        replies: list[Any] = []
        for command, key, value in self.commands:
            if command == "incrby":
                server.values[key] = server.values.get(key, 0) + value
                replies.append(server.values[key])
            else:
                server.ttls[key] = value
                replies.append(True)
        return replies


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def known() -> KnownDevices:
    devices = KnownDevices()
    devices.tenants, devices.limits = dict(TENANTS), dict(LIMITS)
    return devices


def quota(server: FakeCounters, clock: Clock) -> TenantQuota:
    return TenantQuota(server, NAMES, clock=clock, monotonic=clock)  # type: ignore[arg-type]


async def test_replicas_share_one_count_per_tenant_and_second() -> None:
    server, clock = FakeCounters(), Clock(1_773_144_000.25)
    replica_a, replica_b = quota(server, clock), quota(server, clock)
    devices = known()
    first = await replica_a.apply([message("a1", 6), message("g1", 2)], devices)
    second = await replica_b.apply([message("a2", 3), message("a1", 2), message("g1", 2)], devices)
    assert outcome(first) == [("a1", 6, []), ("g1", 2, [])]
    # acme: 6 + 3 = 9 of 10, then 2 more do not fit; globex: 2 + 2 > 3.
    assert outcome(second) == [("a2", 3, []), ("a1", 0, ["tenant_quota"]), ("g1", 0, ["tenant_quota"])]
    key = NAMES.tenant_rate_key(ACME, 1_773_144_000)
    assert key == f"unit:ingest:tenant-rate:{ACME}:1773144000"
    assert server.values[key] == 11  # the refused readings count too: they were asked for
    assert server.ttls[key] == 5

    clock.now += 1  # the next second starts from zero
    again = await replica_a.apply([message("a1", 10), message("g1", 3)], devices)
    assert outcome(again) == [("a1", 10, []), ("g1", 3, [])]


async def test_a_batch_without_a_limited_tenant_costs_no_redis_call() -> None:
    server = FakeCounters()
    batch = [message("f1", 500), message("unknown-device", 3)]
    assert await quota(server, Clock(0.0)).apply(batch, known()) is batch
    assert server.pipelines == 0


async def test_without_redis_batches_are_stored_unchecked_and_redis_is_asked_again_later() -> None:
    server, clock = FakeCounters(), Clock(1_000.0)
    limited = quota(server, clock)
    devices = known()
    unchecked = metrics.TENANT_QUOTA_UNCHECKED._value.get()
    server.down = True
    with capture_logs() as logs:
        batch = [message("g1", 50)]
        assert await limited.apply(batch, devices) is batch  # fail open: readings matter more
        clock.now += RETRY_AFTER_S / 2
        server.down = False
        assert await limited.apply(batch, devices) is batch  # not asked again yet
        assert server.pipelines == 0
        clock.now += RETRY_AFTER_S
        assert outcome(await limited.apply(batch, devices)) == [("g1", 0, ["tenant_quota"])]
    assert metrics.TENANT_QUOTA_UNCHECKED._value.get() == unchecked + 2
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("tenant readings limits not enforced: Redis unavailable; storing unchecked", "warning"),
        ("tenant readings limits enforced again", "info"),
    ]


@pytest.mark.parametrize("limit", [0, 1])
async def test_a_limit_of_zero_refuses_everything_and_one_admits_a_single_reading(limit: int) -> None:
    devices = known()
    devices.limits[GLOBEX] = TenantLimits("globex", max_readings_per_s=limit)
    admitted = await quota(FakeCounters(), Clock(5.0)).apply([message("g1", 1), message("g1", 1)], devices)
    assert [len(d.readings) for d in admitted] == ([0, 0] if limit == 0 else [1, 0])
