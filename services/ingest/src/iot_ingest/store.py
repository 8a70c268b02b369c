"""Writing batches: PostgreSQL first (retried until committed), then Redis (best effort, pipelined).

A batch is one transaction: telemetry rows, dead letters, devices' last-seen time and status. While
PostgreSQL is unreachable the write is retried with backoff and nothing is acknowledged, so the broker
keeps every message; a redelivered reading is a no-op thanks to the telemetry primary key.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import msgspec
import redis.asyncio as aioredis
import redis.exceptions
import structlog

from iot_common.commands import APPLY_ACKS, ack_columns, command_event, publish_command_event
from iot_common.db.telemetry import insert_telemetry
from iot_common.messages import LatestValue, Reading, StatusEvent, TelemetryEvent, encode_event
from iot_common.topics import RedisNames
from iot_ingest import metrics
from iot_ingest.payload import RejectReason
from iot_ingest.plan import (
    DeadLetter,
    Delivery,
    Plan,
    dead_letter,
    latest_values,
    payload_excerpt,
    plan_batch,
    safe_text,
    ts_sort_key,
)

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[Any] | PoolConnectionProxy[Any]

log = structlog.stdlib.get_logger(__name__)

TRANSIENT_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
)
"""Errors that a later attempt can get past: the batch is retried as a whole."""

DATA_ERRORS: Final = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.exceptions.ProgramLimitExceededError,
)
"""Errors caused by some row of the batch: its messages are then written one by one to find it."""


def message_fault(exc: BaseException) -> bool:
    """Whether ``exc`` may come from one message's content, so that writing messages one by one finds it.

    Data errors do, and so does any error of the code that is not PostgreSQL's (a value the driver cannot
    encode, a fault on some odd message). Transient errors and PostgreSQL's other errors (a missing table, a
    permission) concern the whole batch: it is retried as is, never dropped.
    """
    if isinstance(exc, DATA_ERRORS):
        return True
    if isinstance(exc, (*TRANSIENT_ERRORS, asyncpg.PostgresError)):
        return False
    return isinstance(exc, Exception)


INSERT_DEAD_LETTERS = """
INSERT INTO ingest_rejects (topic, device_id, reason, detail, payload, payload_size, received_at)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int4[], $7::timestamptz[]
)
"""
UPDATE_LAST_SEEN = """
UPDATE devices d SET last_seen = GREATEST(d.last_seen, u.seen)
FROM unnest($1::text[], $2::timestamptz[]) AS u(id, seen)
WHERE d.id = u.id AND (d.last_seen IS NULL OR d.last_seen < u.seen)
"""
UPDATE_STATUS = """
UPDATE devices d SET status = u.status, updated_at = now()
FROM unnest($1::text[], $2::text[]) AS u(id, status)
WHERE d.id = u.id AND d.status <> u.status
"""
REGISTER_DEVICES = """
INSERT INTO devices (id) SELECT unnest($1::text[]) ORDER BY 1 ON CONFLICT (id) DO NOTHING RETURNING id
"""

LATEST_SCRIPT = """
local function sort_key(encoded)
  local ok, doc = pcall(cjson.decode, encoded)
  if not ok or type(doc) ~= 'table' or type(doc.ts) ~= 'string' then return '' end
  local base, frac = string.match(doc.ts, '^(%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d)%.?(%d*)')
  if not base then return '' end
  return base .. string.sub(frac .. '000000', 1, 6)
end
local written = 0
for i = 1, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if not current or sort_key(current) <= ARGV[i + 1] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    written = written + 1
  end
end
return written
"""
"""Sets each metric of a device's latest-values hash unless the hash already holds a newer value.

ARGV holds (metric, sort key of its ts, encoded LatestValue) triples; see :func:`plan.ts_sort_key`.
"""

_latest_encoder: Final = msgspec.json.Encoder()


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
    changed = {e.id: e for e in plan.command_events}
    for event in changed.values():
        metrics.COMMAND_ACKS.labels(event.state).inc()
        log.info("command answered", device_id=event.device_id, command_id=event.id, state=event.state)
    ignored = len(plan.acks) - len(changed)
    if ignored:
        metrics.COMMAND_ACKS.labels("ignored").inc(ignored)
        log.info("command answers ignored: unknown command or no longer waiting", count=ignored)


class KnownDevices:
    """The ids and types of registered devices, cached so that a message costs no query.

    Reloaded in full every ``refresh_s`` (devices created or deleted through the API appear then, and type
    changes, which alert rules on a device type follow); an id missing from the cache is looked up once
    per batch before it is refused.
    """

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.types: dict[str, str] = {}

    async def load(self, conn: Conn) -> None:
        rows = await conn.fetch("SELECT id, type FROM devices")
        self.types = {row[0]: row[1] for row in rows}
        self.ids = set(self.types)

    async def resolve(self, conn: Conn, candidates: Iterable[str], register: bool) -> set[str]:
        """Of ``candidates``, the ids that are still unknown after a look-up (and registration)."""
        missing = sorted(set(candidates) - self.ids)
        if not missing:
            return set()
        if register:
            created = await conn.fetch(REGISTER_DEVICES, missing)
            metrics.DEVICES_REGISTERED.inc(len(created))
            if created:
                log.info("devices registered", device_ids=[r[0] for r in created][:20], count=len(created))
        rows = await conn.fetch("SELECT id, type FROM devices WHERE id = ANY($1::text[])", missing)
        found = {row[0] for row in rows}
        self.types.update({row[0]: row[1] for row in rows})
        self.ids |= found
        return set(missing) - found

    async def refresh_forever(self, pool: asyncpg.Pool[Any], refresh_s: float) -> None:
        while True:
            await asyncio.sleep(refresh_s)
            try:
                async with pool.acquire() as conn:
                    await self.load(conn)
            except (*TRANSIENT_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("device cache refresh failed", error=str(exc))


class BatchWriter:
    """The batcher's flush: commit a batch to PostgreSQL, then update Redis.

    Returns (so that the batch's messages are acknowledged) only once the transaction is committed; the
    Redis step then runs in the background, each batch after the previous one, so Redis never delays an
    acknowledgement and events of one device are published in commit order.
    """

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        redis_client: aioredis.Redis,
        known: KnownDevices,
        *,
        names: RedisNames,
        auto_register: bool,
        retry_initial_s: float = 0.1,
        retry_max_s: float = 5.0,
        on_commit: Callable[[list[Reading]], None] | None = None,
    ) -> None:
        self._pool = pool
        self._redis = redis_client
        self._names = names
        self._known = known
        self._auto_register = auto_register
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._latest_script = redis_client.register_script(LATEST_SCRIPT)
        self._redis_tail: asyncio.Task[None] | None = None
        self._on_commit = on_commit

    async def __call__(self, batch: list[Delivery]) -> asyncio.Task[None]:
        """Commit ``batch``, then start its Redis step; the returned task is that step.

        The batcher answers the batch's messages (their PUBACKs) when the task is done, so that a crash
        between the PUBACK and the publish cannot lose a WebSocket event; the next batch's commit does not
        wait for it. The Redis step never takes longer than the client's socket timeout, and a failure
        there is logged and counted, not retried: the readings are stored either way.
        """
        plan = await self._commit_with_retry(batch)
        previous = self._redis_tail
        self._redis_tail = task = asyncio.create_task(self._update_redis(plan, previous))
        if self._on_commit is not None and plan.readings:
            # Alert rules: only queued here, so that the batch's PUBACKs do not wait for them.
            self._on_commit(plan.readings)
        return task

    async def drain(self) -> None:
        """Wait for the Redis step of every committed batch."""
        while self._redis_tail is not None and not self._redis_tail.done():
            await asyncio.wait([self._redis_tail])

    async def _commit_with_retry(self, batch: list[Delivery]) -> Plan:
        """Commit ``batch``; never raises (but :class:`asyncio.CancelledError`): a message that cannot be
        stored becomes a dead letter, and what concerns the whole batch is retried with backoff."""
        delay = self._retry_initial_s
        isolate = False
        while True:
            started = time.perf_counter()
            try:
                plan = await self._commit(batch, isolate)
            except Exception as exc:
                if not isolate and message_fault(exc):
                    log.warning(
                        "batch refused, writing its messages one by one",
                        error=f"{type(exc).__name__}: {exc}"[:500],
                    )
                    isolate = True
                    continue
                metrics.STORAGE_RETRIES.inc()
                log.warning(
                    "batch write failed, retrying",
                    error=f"{type(exc).__name__}: {exc}"[:500],
                    messages=len(batch),
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
                continue
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

    async def _commit(self, batch: list[Delivery], isolate: bool) -> Plan:
        async with self._pool.acquire() as conn, conn.transaction():
            candidates = (d.device_id for d in batch if d.needs_device and d.device_id not in self._known.ids)
            unknown = await self._known.resolve(conn, candidates, self._auto_register)  # type: ignore[arg-type]
            if not isolate:
                plan = plan_batch(batch, unknown)
                await self._write(conn, plan)
                return plan
            # One savepoint per message: a message that cannot be stored becomes a dead letter.
            merged = plan_batch([], set())
            for delivery in batch:
                try:
                    one = plan_batch([delivery], unknown)
                    async with conn.transaction():
                        await self._write(conn, one)
                except Exception as exc:
                    if not message_fault(exc):
                        raise
                    one = await self._write_instead(conn, delivery, exc)
                merged.readings += one.readings
                merged.new_rows += one.new_rows
                merged.dead_letters += one.dead_letters
                merged.statuses.update(one.statuses)
                merged.acks += one.acks
                merged.command_events += one.command_events
                merged.last_seen.update(one.last_seen)
            return merged

    async def _write_instead(self, conn: Conn, delivery: Delivery, exc: Exception) -> Plan:
        """A dead letter for a message that could not be stored; if even that is refused, a bare one
        (no payload, no device); if that is refused too, the message is only logged and counted."""
        reason: RejectReason = "storage_error" if isinstance(exc, asyncpg.PostgresError) else "handler_error"
        if reason == "handler_error":
            metrics.HANDLER_ERRORS.labels("store").inc()
        detail = f"{type(exc).__name__}: {exc}"
        letter = dead_letter(delivery, reason, detail)
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
            one = plan_batch([], set())
            one.dead_letters.append(candidate)
            try:
                async with conn.transaction():
                    await self._write(conn, one)
            except Exception as again:
                if not message_fault(again):
                    raise
                detail = f"{type(again).__name__}: {again}"
                continue
            return one
        metrics.HANDLER_ERRORS.labels("store").inc()
        log.error(
            "message and its dead letter refused; acknowledged and dropped",
            topic=delivery.topic[:200],
            device_id=delivery.device_id,
            payload=payload_excerpt(delivery.payload),
            error=detail[:500],
        )
        return plan_batch([], set())

    async def _write(self, conn: Conn, plan: Plan) -> None:
        plan.new_rows = await insert_telemetry(conn, plan.readings)
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
            )
        # Sorted ids: concurrent replicas lock device rows in the same order and cannot deadlock.
        if plan.last_seen:
            ids = sorted(plan.last_seen)
            await conn.execute(UPDATE_LAST_SEEN, ids, [plan.last_seen[i] for i in ids])
        if plan.statuses:
            ids = sorted(plan.statuses)
            await conn.execute(UPDATE_STATUS, ids, [plan.statuses[i][0] for i in ids])
        if plan.acks:
            answered = await conn.fetch(APPLY_ACKS, *ack_columns(plan.acks))
            plan.command_events = [command_event(r) for r in answered]

    async def _update_redis(self, plan: Plan, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            with contextlib.suppress(Exception):
                await previous
        if not plan.readings and not plan.statuses and not plan.command_events:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for device_id, values in latest_values(plan.readings).items():
                    args: list[str | bytes] = []
                    for name, (ts, value) in values.items():
                        args += [name, ts_sort_key(ts), _latest_encoder.encode(LatestValue(value, ts))]
                    await self._latest_script(
                        keys=[self._names.latest_key(device_id)], args=args, client=pipe
                    )
                for reading in plan.readings:
                    event = TelemetryEvent(reading.device_id, reading.ts, reading.metrics)
                    pipe.publish(self._names.device_channel(reading.device_id), encode_event(event))
                for device_id, (status, at) in plan.statuses.items():
                    pipe.publish(
                        self._names.device_channel(device_id),
                        encode_event(StatusEvent(device_id, status, at)),
                    )
                for command in plan.command_events:
                    publish_command_event(pipe, self._names, command)
                await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            metrics.REDIS_FAILURES.inc()
            log.warning(
                "redis update failed; readings are stored, latest values and events of this batch are missed",
                error=f"{type(exc).__name__}: {exc}",
                readings=len(plan.readings),
            )
