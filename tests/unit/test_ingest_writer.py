"""The ingest writer's retry and isolate paths, against a small in-memory stand-in for PostgreSQL.

A batch is one transaction: what fails because of the whole batch (a lost connection, a missing table)
is retried as it is, with backoff, until it commits; what fails because of one message's content is
found by writing the messages one by one (a savepoint each), and only that message becomes a dead letter.
The same paths against the real PostgreSQL: tests/integration/test_ingest_store.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from iot_common.messages import Reading
from iot_common.topics import RedisNames
from iot_ingest import metrics
from iot_ingest.devices import KnownDevices, TenantLimits
from iot_ingest.plan import Delivery, Plan
from iot_ingest.telemetry import (
    INSERT_TELEMETRY,
    INSERT_TELEMETRY_MARKING_LATE,
    INSERT_TELEMETRY_MARKING_LATE_TOUCHING,
    INSERT_TELEMETRY_TOUCHING,
)
from iot_ingest.tenant_quota import TenantQuota
from iot_ingest.writer import INSERT_DEAD_LETTERS, MARK_ONLINE_BY_READING, BatchWriter
from tests.unit.test_tenant_quota import FakeCounters

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
TELEMETRY_STATEMENTS = (
    INSERT_TELEMETRY,
    INSERT_TELEMETRY_MARKING_LATE,
    INSERT_TELEMETRY_TOUCHING,
    INSERT_TELEMETRY_MARKING_LATE_TOUCHING,
)
TENANT = "00000000-0000-0000-0000-00000000000a"


class FakeDatabase:
    """Telemetry rows and dead letters, committed per transaction (or per statement, outside one);
    savepoints roll back on an error.

    ``faults`` are raised, one per statement, before the next statements run (a lost connection...);
    a telemetry row of a device in ``refuses`` makes its statement fail with that device's error.
    """

    def __init__(self) -> None:
        self.telemetry: list[tuple[str, str, float | None]] = []
        self.letters: list[tuple[str | None, str, str]] = []
        self.letter_tenants: list[str | None] = []
        self.faults: list[BaseException] = []
        self.refuses: dict[str, Callable[[], Exception]] = {}
        self.statements = 0
        self.begins = 0
        self._pending_rows: list[tuple[str, str, float | None]] = []
        self._pending_letters: list[tuple[str | None, str, str]] = []
        self._depth = 0

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[FakeDatabase]:
        yield self

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        rows, letters = len(self._pending_rows), len(self._pending_letters)
        self.begins += self._depth == 0
        self._depth += 1
        try:
            yield
        except BaseException:
            del self._pending_rows[rows:], self._pending_letters[letters:]
            raise
        finally:
            self._depth -= 1
        if self._depth == 0:
            self._commit()

    def _commit(self) -> None:
        self.telemetry += self._pending_rows
        self.letters += self._pending_letters
        self._pending_rows, self._pending_letters = [], []

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        if query == MARK_ONLINE_BY_READING:
            self.statements += 1
            return []  # no device of these tests is marked offline
        raise AssertionError("every device of these tests is known: no look-up expected")

    async def fetchrow(self, query: str, *args: Any) -> dict[str, Any]:
        """The telemetry statement, which answers its count of new rows: here every row is new (and no
        device of these tests is marked offline)."""
        status = await self.execute(query, *args)
        return {"n": int(status.rsplit(" ", 1)[1]), "devices": None, "stamps": None, "woke": []}

    async def execute(self, query: str, *args: Any) -> str:
        self.statements += 1
        if self.faults:
            raise self.faults.pop(0)
        if query in TELEMETRY_STATEMENTS:  # readings in the past: the marking ones
            devices, names, _, values, _ = args[:5]
            for device in devices:
                if device in self.refuses:
                    raise self.refuses[device]()
            self._pending_rows += zip(devices, names, values, strict=True)
            if self._depth == 0:  # a statement outside a transaction block commits on its own
                self._commit()
            return f"INSERT 0 {len(devices)}"
        if query == INSERT_DEAD_LETTERS:
            devices, reasons, details, tenants = args[1], args[2], args[3], args[7]
            self._pending_letters += zip(devices, reasons, details, strict=True)
            self.letter_tenants += tenants
        return "UPDATE 0"


class FakeOutput:
    """Stands for the Redis step: records the committed plans."""

    def __init__(self) -> None:
        self.plans: list[Plan] = []

    def submit(self, plan: Plan) -> asyncio.Task[None]:
        self.plans.append(plan)
        return asyncio.ensure_future(asyncio.sleep(0))

    async def drain(self) -> None:
        pass


def make_writer(
    db: FakeDatabase, output: FakeOutput | None = None, quota: TenantQuota | None = None
) -> BatchWriter:
    known = KnownDevices()
    known.tenants = dict.fromkeys(("good", "poison", "odd"), TENANT)
    known.limits = {TENANT: TenantLimits("acme", max_readings_per_s=2)}
    return BatchWriter(
        db,  # type: ignore[arg-type]
        known,
        output or FakeOutput(),  # type: ignore[arg-type]
        auto_register=False,
        quota=quota,
        retry_initial_s=0.01,
        retry_max_s=0.04,
    )


def delivery(device_id: str, value: Any, seconds: int = 0) -> Delivery:
    ts = T0 + timedelta(seconds=seconds)
    reading = Reading(device_id, ts, {"t": value})
    return Delivery(f"devices/telemetry/{device_id}", device_id, ts, b'{"t": 1}', readings=[reading])


def count(counter: Any) -> float:
    return float(counter._value.get())


async def test_transient_errors_are_retried_with_backoff_until_the_batch_commits() -> None:
    db = FakeDatabase()
    db.faults = [ConnectionResetError("connection lost"), asyncpg.PostgresConnectionError("gone")] * 2
    output = FakeOutput()
    writer = make_writer(db, output)
    retries = count(metrics.STORAGE_RETRIES)
    with capture_logs() as logs:
        await asyncio.wait_for(writer([delivery("good", 1.0), delivery("good", 2.0, 1)]), 10)
    assert db.telemetry == [("good", "t", 1.0), ("good", "t", 2.0)]
    assert db.letters == []
    failed = [e for e in logs if e["event"] == "batch write failed, retrying"]
    assert [e["retry_in_s"] for e in failed] == [0.01, 0.02, 0.04, 0.04]
    assert all(e["messages"] == 2 for e in failed)
    assert count(metrics.STORAGE_RETRIES) == retries + 4
    assert not any(e["event"] == "batch refused, writing its messages one by one" for e in logs)
    [plan] = output.plans
    assert len(plan.readings) == 2


async def test_a_batch_of_readings_is_one_statement_and_its_devices_part_of_it() -> None:
    """The ordinary batch: its rows and its devices' last-seen time and status in one round trip, without
    BEGIN and COMMIT (a statement is a transaction); with a status message, the devices are written by
    statements of their own, in a transaction."""
    db = FakeDatabase()
    writer = make_writer(db)
    await writer([delivery("good", 1.0), delivery("odd", 2.0, 1), delivery("good", 3.0, 2)])
    assert (db.statements, db.begins) == (1, 0)
    assert db.telemetry == [("good", "t", 1.0), ("odd", "t", 2.0), ("good", "t", 3.0)]
    status = Delivery("devices/status/odd", "odd", T0, b"offline", status="offline")
    await writer([delivery("good", 4.0, 3), status])
    # Telemetry, last seen, status, the readings' devices marked online.
    assert (db.statements, db.begins) == (1 + 4, 1)
    assert db.telemetry[-1] == ("good", "t", 4.0)


async def test_a_postgresql_error_about_the_whole_batch_is_retried_never_dead_lettered() -> None:
    db = FakeDatabase()
    db.faults = [asyncpg.exceptions.UndefinedTableError('relation "telemetry" does not exist')]
    writer = make_writer(db)
    await asyncio.wait_for(writer([delivery("good", 1.0)]), 10)
    assert db.telemetry == [("good", "t", 1.0)]
    assert db.letters == []


async def test_a_poison_row_is_isolated_as_a_dead_letter_and_the_rest_is_stored() -> None:
    db = FakeDatabase()
    db.refuses["poison"] = lambda: asyncpg.DataError("value out of range")
    output = FakeOutput()
    writer = make_writer(db, output)
    retries = count(metrics.STORAGE_RETRIES)
    batch = [delivery("good", 1.0), delivery("poison", 1e308), delivery("good", 2.0, 1)]
    with capture_logs() as logs:
        await asyncio.wait_for(writer(batch), 10)
    assert db.telemetry == [("good", "t", 1.0), ("good", "t", 2.0)]
    [(device, reason, detail)] = db.letters
    assert (device, reason) == ("poison", "storage_error")
    assert "value out of range" in detail
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "batch refused, writing its messages one by one"
    ]
    assert count(metrics.STORAGE_RETRIES) == retries
    # The plan handed on (to Redis and the alerts) holds what was stored, merged message by message.
    [plan] = output.plans
    assert [r.metrics["t"] for r in plan.readings] == [1.0, 2.0]
    assert [d.reason for d in plan.dead_letters] == ["storage_error"]
    assert plan.new_rows == 2


async def test_a_message_the_code_cannot_store_is_a_handler_error_dead_letter() -> None:
    db = FakeDatabase()
    handler_errors = count(metrics.HANDLER_ERRORS.labels("store"))
    await asyncio.wait_for(make_writer(db)([delivery("odd", object()), delivery("good", 3.0)]), 10)
    assert db.telemetry == [("good", "t", 3.0)]
    [(device, reason, detail)] = db.letters
    assert (device, reason) == ("odd", "handler_error")
    assert detail.startswith("TypeError")
    assert count(metrics.HANDLER_ERRORS.labels("store")) == handler_errors + 1


async def test_a_transient_error_while_isolating_is_retried_and_isolation_goes_on() -> None:
    db = FakeDatabase()
    db.refuses["poison"] = lambda: asyncpg.DataError("invalid input")
    refuse = db.execute

    async def execute(query: str, *args: Any) -> str:
        try:
            return await refuse(query, *args)
        except asyncpg.DataError:
            if not db.letters and not db.faults and db.statements == 1:
                # The connection drops right after the batch is refused: the next statement fails.
                db.faults.append(ConnectionResetError("connection lost while isolating"))
            raise

    db.execute = execute  # type: ignore[method-assign]
    with capture_logs() as logs:
        await asyncio.wait_for(make_writer(db)([delivery("good", 1.0), delivery("poison", 2.0)]), 10)
    assert db.telemetry == [("good", "t", 1.0)]
    assert [(d, r) for d, r, _ in db.letters] == [("poison", "storage_error")]
    events = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert events == ["batch refused, writing its messages one by one", "batch write failed, retrying"]


async def test_a_cancelled_write_is_not_retried() -> None:
    db = FakeDatabase()
    db.faults = [asyncio.CancelledError()]
    with pytest.raises(asyncio.CancelledError):
        await make_writer(db)([delivery("good", 1.0)])
    assert db.statements == 1
    assert db.telemetry == []


async def test_a_retried_batch_is_counted_once_against_its_tenants_limit() -> None:
    db = FakeDatabase()
    db.faults = [ConnectionResetError("connection lost")] * 2
    counters, output = FakeCounters(), FakeOutput()
    quota = TenantQuota(counters, RedisNames("unit"), clock=lambda: 1000.0)  # type: ignore[arg-type]
    writer = make_writer(db, output, quota)
    batch = [delivery("good", 1.0), delivery("poison", 2.0, 1), delivery("odd", 3.0, 2)]
    await asyncio.wait_for(writer(batch), 10)
    # Two of acme's 2 readings/s stored; the third is its tenant's dead letter; three attempts, one count.
    assert db.telemetry == [("good", "t", 1.0), ("poison", "t", 2.0)]
    assert [(d, r) for d, r, _ in db.letters] == [("odd", "tenant_quota")]
    assert db.letter_tenants == [TENANT]
    assert counters.pipelines == 1
    assert counters.values == {f"unit:ingest:tenant-rate:{TENANT}:1000": 3}
    [plan] = output.plans
    assert plan.tenants == {"good": TENANT, "poison": TENANT}
