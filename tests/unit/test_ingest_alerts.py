"""The alert service of an ingest replica, with small stand-ins for PostgreSQL, Redis and the action runner.

Committed readings go through the rules in the worker; an alert that really opens or resolves (its row
inserted or updated) is published on the device channel and starts the rule's action; every transition
is also a note for the other replicas. Storing is retried while PostgreSQL fails, and given up on a data
error; a failed reload keeps the rules in use. End to end, with the real backends: tests/e2e/test_alerts.py.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest
from structlog.testing import capture_logs

from iot_common.messages import AlertEvent, Reading, decode_event
from iot_common.topics import RedisNames
from iot_ingest import alerts as alerts_module
from iot_ingest import metrics
from iot_ingest.actions import QUEUE_RUN, ActionJob
from iot_ingest.alerts import LOAD_OPEN, LOAD_RULES, OPEN_ALERT, RESOLVE_ALERT, AlertService, SyncNote
from iot_ingest.devices import KnownDevices

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
RULE_ID = "5f0c3a52-8d5e-4a44-9d0c-0a4b3b8f2c11"
NAMES = RedisNames("unit-alerts")
TENANT, OTHER = "00000000-0000-0000-0000-00000000000a", "00000000-0000-0000-0000-00000000000b"
WEBHOOK = {"type": "webhook", "url": "https://hooks.example/alert", "on": ["open"]}


def rule_row(**overrides: Any) -> dict[str, Any]:
    row = {
        "id": RULE_ID,
        "tenant_id": TENANT,
        "metric": "temp",
        "op": ">",
        "threshold": 30.0,
        "device_id": "dev-1",
        "device_type": None,
        "for_seconds": 0,
        "hysteresis": 0.0,
        "severity": "warning",
        "message": "too hot",
        "action": WEBHOOK,
    }
    return row | overrides


class FakeDatabase:
    """``alert_rules`` and ``alerts`` as lists; ``faults`` are raised by the next statements."""

    def __init__(self, rules: list[dict[str, Any]]) -> None:
        self.rules = rules
        self.open: dict[tuple[str, str], dict[str, Any]] = {}
        self.resolved: list[dict[str, Any]] = []
        self.runs: list[tuple[Any, ...]] = []  # action runs queued with the alerts' changes
        self.faults: list[Exception] = []
        self.tenants: list[str] = []
        """The tenant of each alert opened (given by the writer, as the schema's foreign key checks)."""
        self._ids = itertools.count(1)

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[FakeDatabase]:
        yield self

    @asynccontextmanager
    async def transaction(self, **_: Any) -> AsyncIterator[None]:
        opened, resolved, runs = dict(self.open), list(self.resolved), list(self.runs)
        try:
            yield
        except BaseException:
            self.open, self.resolved, self.runs = opened, resolved, runs
            raise

    def _fault(self) -> None:
        if self.faults:
            raise self.faults.pop(0)

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        self._fault()
        if query == LOAD_RULES:
            return list(self.rules)
        assert query == LOAD_OPEN
        return [(rule_id, device_id) for rule_id, device_id in self.open]

    async def fetchval(self, query: str, *args: Any) -> str:
        self._fault()
        assert query == QUEUE_RUN
        self.runs.append(args)
        return f"run-{len(self.runs)}"

    async def fetchrow(self, query: str, *args: Any) -> dict[str, Any] | None:
        self._fault()
        if query == OPEN_ALERT:
            rule_id, device_id, metric, severity, message, value, threshold, opened_at, tenant_id = args
            self.tenants.append(tenant_id)
            if (rule_id, device_id) in self.open:
                return None  # another replica opened it first
            row = {
                "id": f"alert-{next(self._ids)}",
                "rule_id": rule_id,
                "device_id": device_id,
                "metric": metric,
                "severity": severity,
                "state": "open",
                "message": message,
                "value": value,
                "threshold": threshold,
                "opened_at": opened_at,
                "resolved_at": None,
                "acked_at": None,
            }
            self.open[(rule_id, device_id)] = row
            return row
        assert query == RESOLVE_ALERT
        rule_id, device_id, at = args
        row = self.open.pop((rule_id, device_id), None)
        if row is None:
            return None
        row = row | {"state": "resolved", "resolved_at": max(row["opened_at"], at)}
        self.resolved.append(row)
        return row


class FakePipeline:
    def __init__(self, redis: FakeRedis) -> None:
        self._redis = redis
        self._queued: list[tuple[str, bytes]] = []

    async def __aenter__(self) -> FakePipeline:
        return self

    async def __aexit__(self, *_: object) -> None:
        pass

    def publish(self, channel: str, data: bytes) -> None:
        self._queued.append((channel, data))

    async def execute(self) -> None:
        self._redis.published += self._queued


class FakeRedis:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)

    def events(self, device_id: str = "dev-1", tenant_id: str = TENANT) -> list[AlertEvent]:
        channel = NAMES.device_channel(tenant_id, device_id)
        return [decode_event(data) for name, data in self.published if name == channel]  # type: ignore[misc]

    def notes(self) -> list[SyncNote]:
        decoder = msgspec.json.Decoder(SyncNote)
        return [decoder.decode(data) for name, data in self.published if name == NAMES.alert_sync]


class FakeActions:
    def __init__(self) -> None:
        self.jobs: list[ActionJob] = []

    def submit(self, job: ActionJob) -> bool:
        self.jobs.append(job)
        return True

    async def record_dropped(self, job: ActionJob) -> None:
        raise AssertionError("the fake's queue is never full")


class Replica:
    """An :class:`AlertService` on the fakes, its worker running."""

    def __init__(self, db: FakeDatabase, queue_size: int = 100) -> None:
        self.db, self.redis, self.actions = db, FakeRedis(), FakeActions()
        known = KnownDevices()
        # Two devices of one type in two tenants.
        known.tenants = {"dev-1": TENANT, "dev-2": OTHER}
        known.types = {"dev-1": "thermo", "dev-2": "thermo"}
        self.service = AlertService(
            db,  # type: ignore[arg-type]
            self.redis,  # type: ignore[arg-type]
            "redis://unused",
            known,
            self.actions,  # type: ignore[arg-type]
            names=NAMES,
            queue_size=queue_size,
        )
        self.worker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Replica:
        assert await self.service.reload()
        self.worker = asyncio.create_task(self.service.run())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.worker is not None
        self.worker.cancel()
        await asyncio.gather(self.worker, return_exceptions=True)

    async def send(self, *temps: float, device_id: str = "dev-1") -> None:
        readings = [Reading(device_id, T0 + timedelta(seconds=i), {"temp": t}) for i, t in enumerate(temps)]
        self.service.submit(readings)
        await asyncio.wait_for(self.service.drain(), 10)


def count(counter: Any) -> float:
    return float(counter._value.get())


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alerts_module, "RETRY_INITIAL_S", 0.001)
    monkeypatch.setattr(alerts_module, "RETRY_MAX_S", 0.004)


async def test_an_alert_opens_is_published_and_starts_its_action_then_resolves() -> None:
    async with Replica(FakeDatabase([rule_row()])) as replica:
        await replica.send(25.0, 31.5, 33.0)
        [opened] = replica.redis.events()
        assert (opened.state, opened.value, opened.rule_id) == ("open", 31.5, RULE_ID)
        [job] = replica.actions.jobs
        assert (job.trigger, job.alert.id, job.alert.state) == ("open", opened.id, "open")
        assert job.action.url == WEBHOOK["url"]  # type: ignore[union-attr]
        await replica.send(12.0)
        resolved = replica.redis.events()[-1]
        assert (resolved.id, resolved.state) == (opened.id, "resolved")
        # The rule's action runs on "open" only.
        assert len(replica.actions.jobs) == 1
        assert [n.kind for n in replica.redis.notes()] == ["open", "resolve"]
        assert all(n.replica == replica.service.replica for n in replica.redis.notes())


async def test_a_rule_sees_only_the_devices_of_its_tenant() -> None:
    by_type = rule_row(device_id=None, device_type="thermo")
    named = rule_row(id="9e4b1c20-0d55-4c1f-8e2a-111111111111", device_id="dev-2")  # in TENANT, names OTHER's
    async with Replica(FakeDatabase([by_type, named])) as replica:
        await replica.send(40.0, device_id="dev-2")
        assert replica.redis.published == []
        assert replica.actions.jobs == []
        await replica.send(40.0, device_id="dev-1")
        [opened] = replica.redis.events("dev-1", TENANT)
        assert opened.rule_id == RULE_ID
        assert replica.redis.events("dev-1", OTHER) == []  # published in the device's tenant only
        [job] = replica.actions.jobs
        assert job.tenant_id == TENANT
    assert replica.db.tenants == [TENANT]


async def test_an_alert_another_replica_opened_is_not_published_again() -> None:
    db = FakeDatabase([rule_row()])
    async with Replica(db) as first, Replica(db) as second:
        await first.send(40.0)
        await second.send(41.0)
    assert len(first.redis.events()) == 1
    assert second.redis.events() == []
    assert second.actions.jobs == []
    # Its note still tells the others what it saw.
    assert [n.kind for n in second.redis.notes()] == ["open"]


async def test_storing_transitions_is_retried_while_postgresql_fails() -> None:
    db = FakeDatabase([rule_row()])
    retries = count(metrics.ALERT_STORE_RETRIES)
    async with Replica(db) as replica:
        db.faults = [ConnectionResetError("connection lost"), asyncpg.PostgresConnectionError("gone")]
        with capture_logs() as logs:
            await replica.send(35.0)
    assert len(db.open) == 1
    assert [e.state for e in replica.redis.events()] == ["open"]
    assert len(replica.actions.jobs) == 1
    assert count(metrics.ALERT_STORE_RETRIES) == retries + 2
    failed = [e for e in logs if e["event"] == "storing alert transitions failed, retrying"]
    assert [e["retry_in_s"] for e in failed] == [0.001, 0.002]


async def test_transitions_postgresql_refuses_are_dropped_not_retried() -> None:
    db = FakeDatabase([rule_row()])
    refused = count(metrics.ALERT_ERRORS.labels("refused"))
    async with Replica(db) as replica:
        db.faults = [asyncpg.DataError("invalid input")]
        with capture_logs() as logs:
            await replica.send(35.0)
    assert db.open == {}
    assert replica.redis.published == []
    assert replica.actions.jobs == []
    assert count(metrics.ALERT_ERRORS.labels("refused")) == refused + 1
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "alert transitions refused by PostgreSQL, dropped"
    ]


async def test_a_failed_reload_keeps_the_rules_in_use() -> None:
    db = FakeDatabase([rule_row()])
    async with Replica(db) as replica:
        db.faults = [ConnectionResetError("connection lost")]
        assert not await replica.service.reload()
        assert [r.id for r in replica.service.engine.rules] == [RULE_ID]
        await replica.send(35.0)
    assert len(db.open) == 1


async def test_a_reload_takes_changed_rules_and_the_open_alerts() -> None:
    db = FakeDatabase([rule_row()])
    async with Replica(db) as replica:
        await replica.send(35.0)
        db.rules = [rule_row(threshold=50.0, action=None)]
        replica.service.request_reload()
        await replica.send(45.0, 60.0)
    # The alert opened before the reload stays open across it (not opened twice); under the new threshold
    # 45 resolves it, and 60 opens a new one, whose rule has no action any more.
    states = [e.state for e in replica.redis.events()]
    assert states == ["open", "resolved", "open"]
    assert len(replica.actions.jobs) == 1


async def test_a_full_queue_drops_batches_and_counts_them() -> None:
    dropped = count(metrics.ALERT_ERRORS.labels("dropped"))
    replica = Replica(FakeDatabase([rule_row()]), queue_size=1)
    assert await replica.service.reload()
    readings = [Reading("dev-1", T0, {"temp": 40.0})]
    with capture_logs() as logs:
        for _ in range(3):
            replica.service.submit(readings)
    assert count(metrics.ALERT_ERRORS.labels("dropped")) == dropped + 2
    assert [e["event"] for e in logs] == ["alert queue full: batches not evaluated"]


async def test_without_rules_nothing_is_queued() -> None:
    dropped = count(metrics.ALERT_ERRORS.labels("dropped"))
    replica = Replica(FakeDatabase([]), queue_size=1)
    assert await replica.service.reload()
    for _ in range(3):
        replica.service.submit([Reading("dev-1", T0, {"temp": 40.0})])
    await asyncio.wait_for(replica.service.drain(), 1)
    assert count(metrics.ALERT_ERRORS.labels("dropped")) == dropped
