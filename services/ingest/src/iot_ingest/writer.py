"""Writing batches to PostgreSQL: one transaction per batch, retried until committed.

A batch is one transaction: telemetry rows, dead letters, devices' last-seen time and status, command
answers. While PostgreSQL is unreachable the write is retried with backoff and nothing is acknowledged,
so the broker keeps every message; a redelivered reading is a no-op thanks to the telemetry primary key.
A batch refused because of some message's content is written again message by message, and the messages
that cannot be stored become dead letters. After the commit, :class:`~iot_ingest.redis_output.RedisOutput`
takes the batch to Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import structlog

from iot_common.commands import APPLY_ACKS, ack_columns, command_event
from iot_common.messages import Reading
from iot_common.resilience import Backoff, retry
from iot_common.state import StateProblem, apply_change
from iot_ingest import metrics
from iot_ingest.devices import KnownDevices
from iot_ingest.errors import message_fault
from iot_ingest.payload import Reject, RejectReason
from iot_ingest.plan import DeadLetter, Delivery, Plan, dead_letter, payload_excerpt, plan_batch, safe_text
from iot_ingest.redis_output import RedisOutput
from iot_ingest.telemetry import insert_telemetry
from iot_ingest.tenant_quota import TenantQuota

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[Any] | PoolConnectionProxy[Any]

log = structlog.stdlib.get_logger(__name__)

INSERT_DEAD_LETTERS: Final = """
INSERT INTO ingest_rejects (topic, device_id, reason, detail, payload, payload_size, received_at, tenant_id)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int4[], $7::timestamptz[], $8::uuid[]
)
"""
UPDATE_LAST_SEEN: Final = """
UPDATE devices d SET last_seen = GREATEST(d.last_seen, u.seen)
FROM unnest($1::text[], $2::timestamptz[]) AS u(id, seen)
WHERE d.id = u.id AND (d.last_seen IS NULL OR d.last_seen < u.seen)
"""
UPDATE_STATUS: Final = """
UPDATE devices d SET status = u.status, updated_at = now()
FROM unnest($1::text[], $2::text[]) AS u(id, status)
WHERE d.id = u.id AND d.status <> u.status
"""
MARK_ONLINE_BY_READING: Final = """
UPDATE devices SET status = 'online', updated_at = now()
WHERE id = ANY($1::text[]) AND status = 'offline'
RETURNING id
"""
"""A reading from a device marked ``offline`` (no status message in its batch): it is connected again,
whether or not its ``online`` message was sent or came first."""


def _log_dead_letters(plan: Plan) -> None:
    """Count dead letters by reason, and log one line per device and reason of the batch."""
    counts: dict[tuple[str | None, str], int] = {}
    for letter in plan.dead_letters:
        key = (letter.device_id, letter.reason)
        counts[key] = counts.get(key, 0) + 1
    for (device_id, reason), count in counts.items():
        metrics.REJECTED.labels(reason).inc(count)
        log.info("dead letters written", device_id=device_id, reason=reason, count=count)


def _count_acks(plan: Plan) -> None:
    """Count command answers: those that changed a command, and those ignored (unknown id or late)."""
    changed = {e.id: e for _, e in plan.command_events}
    for event in changed.values():
        metrics.COMMAND_ACKS.labels(event.state).inc()
        log.info("command answered", device_id=event.device_id, command_id=event.id, state=event.state)
    ignored = len(plan.acks) - len(changed)
    if ignored:
        metrics.COMMAND_ACKS.labels("ignored").inc(ignored)
        log.info("command answers ignored: unknown command or no longer waiting", count=ignored)


class BatchWriter:
    """The batcher's flush: commit a batch to PostgreSQL, then hand it to Redis and to the alerts.

    Returns (so that the batch's messages are acknowledged) only once the transaction is committed; the
    Redis step then runs in the background (:class:`RedisOutput`), so Redis never delays an
    acknowledgement.
    """

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        known: KnownDevices,
        output: RedisOutput,
        *,
        auto_register: bool,
        quota: TenantQuota | None = None,
        retry_initial_s: float = 0.1,
        retry_max_s: float = 5.0,
        on_commit: Callable[[list[Reading]], None] | None = None,
        on_online: Callable[[list[str], asyncio.Task[None]], None] | None = None,
    ) -> None:
        self._pool = pool
        self._known = known
        self._output = output
        self._auto_register = auto_register
        self._quota = quota
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._on_commit = on_commit
        self._on_online = on_online
        self.failing = False
        """True while a batch's transaction is being retried (PostgreSQL unreachable or failing): the HTTP
        edge then answers 503 at once instead of queueing more."""

    async def __call__(self, batch: list[Delivery]) -> asyncio.Task[None]:
        """Commit ``batch``, then start its Redis step; the returned task is that step.

        The batcher answers the batch's messages (their PUBACKs) when the task is done, so that a crash
        between the PUBACK and the publish cannot lose a WebSocket event; the next batch's commit does not
        wait for it.
        """
        plan = await self._commit_with_retry(batch)
        task = self._output.submit(plan)
        if self._on_commit is not None and plan.readings:
            # Alert rules: only queued here, so that the batch's PUBACKs do not wait for them.
            self._on_commit(plan.readings)
        if self._on_online is not None and plan.came_online:
            # The "device came online" hooks, after the batch's Redis step (its status events).
            self._on_online(plan.came_online, task)
        return task

    async def drain(self) -> None:
        """Wait for the Redis step of every committed batch."""
        await self._output.drain()

    async def _commit_with_retry(self, batch: list[Delivery]) -> Plan:
        """Commit ``batch``; never raises (but :class:`asyncio.CancelledError`): a message that cannot be
        stored becomes a dead letter, and what concerns the whole batch is retried with backoff."""
        isolate = False
        admitted: list[list[Delivery]] = []  # the batch after the tenant quotas: decided once, on attempt 1
        attempts = 0

        async def attempt() -> tuple[Plan, float]:
            nonlocal isolate, attempts
            attempts += 1
            started = time.perf_counter()
            try:
                return await self._commit(batch, isolate, admitted), started
            except Exception as exc:
                if isolate or not message_fault(exc):
                    raise
                log.warning(
                    "batch refused, writing its messages one by one",
                    error=f"{type(exc).__name__}: {exc}"[:500],
                )
            isolate = True
            started = time.perf_counter()
            return await self._commit(batch, isolate, admitted), started

        def failed(exc: Exception, delay: float) -> None:
            self.failing = True
            metrics.STORAGE_RETRIES.inc()
            log.warning(
                "batch write failed, retrying",
                error=f"{type(exc).__name__}: {exc}"[:500],
                messages=len(batch),
                retry_in_s=round(delay, 2),
            )

        plan, started = await retry(
            attempt, Backoff(self._retry_initial_s, self._retry_max_s), on_retry=failed
        )
        self.failing = False
        if attempts > 1:
            # A failed attempt may have committed all the same (the connection lost after the commit,
            # before its answer): its rows are not new to the attempt that succeeded, yet no one published
            # them. At least once: publish every reading of a retried batch.
            plan.fresh = None
        plan.settle()
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.READINGS_STORED.inc(len(plan.readings))
        # Counted only once committed: a transaction that failed and was retried counts once.
        metrics.ROWS_STORED.inc(plan.new_rows)
        metrics.ROWS_DUPLICATE.inc(sum(len(r.metrics) for r in plan.readings) - plan.new_rows)
        _log_dead_letters(plan)
        if plan.acks:
            _count_acks(plan)
        return plan

    async def _commit(self, batch: list[Delivery], isolate: bool, admitted: list[list[Delivery]]) -> Plan:
        """One attempt at the batch's transaction. The tenant quotas are applied on the first attempt only
        (``admitted`` keeps the outcome), so a retried batch is not counted twice."""
        known = self._known
        registered: list[str] = []
        candidates = [
            d.device_id
            for d in batch
            if d.device_id is not None and d.needs_device and not known.known(d.device_id)
        ]
        try:
            async with self._pool.acquire() as conn:
                plan: Plan | None = None
                if not isolate and not candidates:
                    # Every device known (no look-up): the plan before the transaction, which the
                    # ordinary batch does without (one statement is a transaction on its own).
                    plan = plan_batch(await self._admit(batch, admitted), {}, known.tenants)
                    if (seen := _one_statement(plan)) is not None:
                        await self._write(conn, plan, seen)
                        return plan
                async with conn.transaction():
                    refused = await known.resolve(conn, candidates, self._auto_register, registered)
                    deliveries = await self._admit(batch, admitted)
                    if not isolate:
                        if plan is None:
                            plan = plan_batch(deliveries, refused, known.tenants)
                        await self._write(conn, plan, _seen_with_readings(plan))
                        return plan
                    # One savepoint per message: a message that cannot be stored becomes a dead letter.
                    merged = Plan()
                    for delivery in deliveries:
                        try:
                            one = plan_batch([delivery], refused, known.tenants)
                            async with conn.transaction():
                                await self._write(conn, one, _seen_with_readings(one))
                        except Exception as exc:
                            if not message_fault(exc):
                                raise
                            one = await self._write_instead(conn, delivery, exc)
                        merged.merge(one)
                    return merged
        except BaseException:
            # Rolled back: the devices this attempt registered do not exist.
            known.forget(registered)
            raise

    async def _admit(self, batch: list[Delivery], admitted: list[list[Delivery]]) -> list[Delivery]:
        """The batch after the tenant quotas, decided on the first attempt and kept in ``admitted``."""
        if not admitted:
            admitted.append(batch if self._quota is None else await self._quota.apply(batch, self._known))
        return admitted[0]

    async def _apply_reports(self, conn: Conn, plan: Plan) -> None:
        """Merge each state report into its device's reported state (devices in id order, so concurrent
        replicas lock rows in one order; a device's reports in arrival order). A report that would make
        the reported state too large becomes a dead letter; one that changes nothing makes no version."""
        order = sorted(range(len(plan.reports)), key=lambda i: plan.reports[i][0])
        events: dict[str, tuple[str, Any]] = {}
        for index in order:
            device_id, report, delivery = plan.reports[index]
            tenant_id = plan.tenants[device_id]
            try:
                state = await apply_change(
                    conn,
                    tenant_id,
                    device_id,
                    "reported",
                    report.reported,
                    "device",
                    at=delivery.received_at,
                    applied_version=report.version,
                )
            except StateProblem as exc:
                plan.dead_letters.append(dead_letter(delivery, "state_too_large", str(exc), tenant_id))
                continue
            if state is not None:
                events[device_id] = (tenant_id, state)
        plan.state_events = list(events.values())

    async def _write_instead(self, conn: Conn, delivery: Delivery, exc: Exception) -> Plan:
        """A dead letter for a message that could not be stored; if even that is refused, a bare one
        (no payload, no device); if that is refused too, the message is only logged and counted."""
        reason: RejectReason = "storage_error" if isinstance(exc, asyncpg.PostgresError) else "handler_error"
        if reason == "handler_error":
            metrics.HANDLER_ERRORS.labels("store").inc()
        detail = f"{type(exc).__name__}: {exc}"
        tenant_id = self._known.tenants.get(delivery.device_id) if delivery.device_id is not None else None
        letter = dead_letter(delivery, reason, detail, tenant_id)
        bare = DeadLetter(
            topic=safe_text(delivery.topic[:1000]),
            device_id=None,
            reason=reason,
            detail=safe_text(f"dead letter refused; first error: {detail[:500]}"),
            payload="",
            payload_size=len(delivery.payload),
            received_at=delivery.received_at,
        )
        for candidate in (letter, bare):
            one = Plan(dead_letters=[candidate])
            try:
                async with conn.transaction():
                    await self._write(conn, one, None)
            except Exception as again:
                if not message_fault(again):
                    raise
                detail = f"{type(again).__name__}: {again}"
                continue
            if delivery.outcome is not None:
                one.outcomes.append((delivery.outcome, 0, Reject(reason, letter.detail)))
            return one
        metrics.HANDLER_ERRORS.labels("store").inc()
        log.error(
            "message and its dead letter refused; acknowledged and dropped",
            topic=delivery.topic[:200],
            device_id=delivery.device_id,
            payload=payload_excerpt(delivery.payload),
            error=detail[:500],
        )
        dropped = Plan()
        if delivery.outcome is not None:
            dropped.outcomes.append((delivery.outcome, 0, Reject(reason, safe_text(detail[:1000]))))
        return dropped

    async def _write(self, conn: Conn, plan: Plan, seen: dict[str, datetime] | None) -> None:
        """Write ``plan``; ``seen`` is :func:`_seen_with_readings` of it (computed once by the caller)."""
        inserted = await insert_telemetry(conn, plan.readings, seen=seen)
        plan.new_rows, plan.fresh = inserted.new_rows, inserted.fresh
        if plan.reports:
            await self._apply_reports(conn, plan)
        if plan.dead_letters:
            letters = plan.dead_letters
            await conn.execute(
                INSERT_DEAD_LETTERS,
                [d.topic for d in letters],
                [d.device_id for d in letters],
                [d.reason for d in letters],
                [d.detail for d in letters],
                [d.payload for d in letters],
                [d.payload_size for d in letters],
                [d.received_at for d in letters],
                [d.tenant_id for d in letters],
            )
        if seen is not None:
            # Done by the telemetry statement (the ordinary batch: one round trip for rows and devices).
            for device_id in inserted.woke:
                plan.statuses[device_id] = ("online", seen[device_id])
        else:
            await self._write_devices(conn, plan)
        plan.came_online = sorted(d for d, (status, _) in plan.statuses.items() if status == "online")
        if plan.acks:
            answered = await conn.fetch(APPLY_ACKS, *ack_columns(plan.acks))
            plan.command_events = [(r["tenant_id"], command_event(r)) for r in answered]

    async def _write_devices(self, conn: Conn, plan: Plan) -> None:
        """The devices' last-seen time and status, for a batch with status messages or state reports."""
        # Sorted ids: concurrent replicas lock device rows in the same order and cannot deadlock.
        if plan.last_seen:
            ids = sorted(plan.last_seen)
            await conn.execute(UPDATE_LAST_SEEN, ids, [plan.last_seen[i] for i in ids])
        if plan.statuses:
            ids = sorted(plan.statuses)
            await conn.execute(UPDATE_STATUS, ids, [plan.statuses[i][0] for i in ids])
        if plan.readings:
            silent = sorted({r.device_id for r in plan.readings} - plan.statuses.keys())
            if silent:
                for row in await conn.fetch(MARK_ONLINE_BY_READING, silent):
                    device_id = row["id"]
                    plan.statuses[device_id] = (
                        "online",
                        plan.last_seen.get(device_id) or plan.readings[0].ts,
                    )


def _one_statement(plan: Plan) -> dict[str, datetime] | None:
    """:func:`_seen_with_readings` of ``plan`` when the telemetry statement writes the whole of it
    (readings only, of known devices), else None: it then runs without ``BEGIN`` and ``COMMIT``, which
    would cost two more round trips."""
    if plan.dead_letters or plan.acks:
        return None
    return _seen_with_readings(plan)


def _seen_with_readings(plan: Plan) -> dict[str, datetime] | None:
    """``plan.last_seen`` when the telemetry statement can write the devices' part of the batch too:
    readings, and no status message nor state report (whose devices' status and last-seen time are
    written by :meth:`BatchWriter._write_devices`, after the reports, as their own statements)."""
    if not plan.readings or plan.statuses or plan.reports:
        return None
    if plan.last_seen.keys() != {r.device_id for r in plan.readings}:
        return None
    return plan.last_seen
