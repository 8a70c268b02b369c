"""Alerts: committed readings run through the rule engine; what opens or resolves is stored and published.

The batch writer hands each committed batch to :meth:`AlertService.submit`, which only queues it: the
PUBACKs of the batch never wait for alert work. One worker task then evaluates the readings in timestamp
order (pure, in memory: no database round trip per reading) and writes the rare transitions:

- open: ``INSERT ... ON CONFLICT`` on the partial unique index ``alerts_one_open_idx``, so that however
  many replicas see the condition, one alert opens per rule and device;
- resolve: ``UPDATE ... WHERE state = 'open'``.

Only a row actually inserted or updated is published (an ``AlertEvent`` on the device channel) and starts
the rule's action, whose run is inserted in the same transaction (see :mod:`iot_ingest.actions`).
Replicas share their view through ``{prefix}:ingest:alert-sync`` (see :mod:`iot_ingest.rules`), and
every reload of the rules (on ``{prefix}:rules-changed`` and periodically) takes the open alerts from
the database, which corrects whatever a lost note left wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Final, Literal

import asyncpg
import msgspec
import redis.asyncio as aioredis
import redis.exceptions
import structlog

from iot_common.alerts import ALERT_COLUMNS, InvalidAction, alert_event, parse_action
from iot_common.messages import Reading, encode_event
from iot_common.redis_client import as_cluster, publish_device_events, pubsub_client
from iot_common.resilience import Backoff, retry
from iot_common.topics import RedisNames
from iot_ingest import metrics
from iot_ingest.actions import ActionJob, ActionRunner, queue_run
from iot_ingest.devices import KnownDevices
from iot_ingest.errors import DATA_ERRORS
from iot_ingest.rules import Kind, Rule, RuleEngine, Transition

log = structlog.stdlib.get_logger(__name__)

LOAD_RULES: Final = """
SELECT id::text AS id, tenant_id::text AS tenant_id, metric, op, threshold, device_id, device_type,
       for_seconds, hysteresis, severity, message, action
FROM alert_rules WHERE enabled
"""
LOAD_OPEN: Final = "SELECT rule_id::text, device_id FROM alerts WHERE state = 'open'"
OPEN_ALERT: Final = f"""
INSERT INTO alerts (rule_id, device_id, metric, severity, message, value, threshold, opened_at, tenant_id)
SELECT $1::uuid, $2, $3, $4, $5, $6, $7, $8, $9::uuid
WHERE EXISTS (SELECT 1 FROM alert_rules WHERE id = $1::uuid AND tenant_id = $9::uuid)
ON CONFLICT (rule_id, device_id) WHERE state = 'open' DO NOTHING
RETURNING {ALERT_COLUMNS}
"""
RESOLVE_ALERT: Final = f"""
UPDATE alerts SET state = 'resolved', resolved_at = GREATEST(opened_at, $3)
WHERE rule_id = $1::uuid AND device_id = $2 AND state = 'open'
RETURNING {ALERT_COLUMNS}
"""
RETRY_INITIAL_S: Final = 0.1
RETRY_MAX_S: Final = 5.0
RESUBSCRIBE_MIN_S: Final = 0.5
RESUBSCRIBE_MAX_S: Final = 30.0


class SyncNote(msgspec.Struct, frozen=True, array_like=True):
    """One change a replica saw, for the others (``{prefix}:ingest:alert-sync``)."""

    replica: str
    kind: Kind
    rule_id: str
    device_id: str
    ts: datetime


_note_encoder: Final = msgspec.json.Encoder()
_note_decoder: Final = msgspec.json.Decoder(SyncNote)
_RELOAD: Final = "reload"


def rule_from_record(record: Any) -> Rule:
    """A row of ``alert_rules`` as a :class:`Rule`; an invalid ``action`` is ignored (logged)."""
    action = record["action"]
    try:
        parse_action(action)
    except InvalidAction as exc:
        log.warning("alert rule has an invalid action, ignored", rule_id=record["id"], error=str(exc))
        action = None
    return Rule(
        id=record["id"],
        tenant_id=record["tenant_id"],
        metric=record["metric"],
        op=record["op"],
        threshold=record["threshold"],
        device_id=record["device_id"],
        device_type=record["device_type"],
        for_seconds=record["for_seconds"],
        hysteresis=record["hysteresis"],
        severity=record["severity"],
        message=record["message"],
        action=action,
    )


def evaluate(engine: RuleEngine, known: KnownDevices, readings: Iterable[Reading]) -> list[Transition]:
    """Every transition and note of ``readings``, evaluated in timestamp order, each reading against the
    rules of its device's tenant."""
    out: list[Transition] = []
    types, tenants = known.types, known.tenants
    for reading in sorted(readings, key=lambda r: r.ts):
        device_id = reading.device_id
        tenant_id = tenants.get(device_id)
        if tenant_id is not None:
            out += engine.evaluate_all(
                tenant_id, device_id, types.get(device_id), reading.ts, reading.metrics
            )
    return out


class AlertService:
    """Owns the rule engine of this replica: reloads, evaluation, storage and publication of alerts."""

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        redis_client: aioredis.Redis,
        redis_url: str,
        known: KnownDevices,
        actions: ActionRunner,
        *,
        names: RedisNames,
        queue_size: int,
    ) -> None:
        self.engine = RuleEngine()
        self._names = names
        self.replica = uuid.uuid4().hex
        self._pool = pool
        self._redis = redis_client
        self._redis_url = redis_url
        self._known = known
        self._actions = actions
        self._queue: asyncio.Queue[list[Reading] | str] = asyncio.Queue(queue_size)
        self._reload_wanted = False
        self._dropped = 0

    def submit(self, readings: list[Reading]) -> None:
        """Queue a committed batch's readings for evaluation; never waits (a full queue drops, counted)."""
        if not readings or not self.engine.rules:
            return
        try:
            self._queue.put_nowait(readings)
        except asyncio.QueueFull:
            metrics.ALERT_ERRORS.labels("dropped").inc()
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 100 == 0:
                log.warning(
                    "alert queue full: batches not evaluated", dropped=self._dropped, readings=len(readings)
                )
            return
        metrics.ALERT_QUEUE.set(self._queue.qsize())

    def request_reload(self) -> None:
        """Reload the rules and open alerts soon, in the worker (so it never races an evaluation)."""
        self._reload_wanted = True
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_RELOAD)

    async def reload(self) -> bool:
        """Load the enabled rules and the open alerts; on failure keep the current ones (False)."""
        try:
            async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
                rules = [rule_from_record(r) for r in await conn.fetch(LOAD_RULES)]
                open_alerts = [(r[0], r[1]) for r in await conn.fetch(LOAD_OPEN)]
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            metrics.RULE_RELOADS.labels("failed").inc()
            log.warning("alert rules reload failed; keeping the previous rules", error=str(exc))
            return False
        self.engine.replace_rules(rules)
        self.engine.set_open_alerts(open_alerts)
        metrics.RULES_LOADED.set(len(rules))
        metrics.RULE_RELOADS.labels("ok").inc()
        log.debug("alert rules loaded", rules=len(rules), open_alerts=len(self.engine.open_alerts))
        return True

    async def drain(self) -> None:
        """Wait until every queued batch is evaluated and stored (bounded by the caller)."""
        await self._queue.join()

    async def run(self) -> None:
        """The worker: evaluates queued batches and writes their transitions, one batch at a time."""
        while True:
            item = await self._queue.get()
            metrics.ALERT_QUEUE.set(self._queue.qsize())
            try:
                if self._reload_wanted:
                    self._reload_wanted = False
                    await self.reload()
                if not isinstance(item, str):
                    transitions = evaluate(self.engine, self._known, item)
                    if transitions:
                        await self._store_with_retry(transitions)
            except Exception:
                log.exception("alert evaluation failed")
            finally:
                self._queue.task_done()

    async def refresh(self) -> None:
        """The periodic safety net beside ``{prefix}:rules-changed``: ask the worker for a reload."""
        self.request_reload()

    async def listen(self) -> None:
        """Follow ``{prefix}:rules-changed`` and the other replicas' notes; reconnect with backoff."""
        backoff = Backoff(RESUBSCRIBE_MIN_S, RESUBSCRIBE_MAX_S)
        while True:
            client = pubsub_client(self._redis_url, socket_connect_timeout=2, health_check_interval=30)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self._names.rules_changed, self._names.alert_sync)
                # Whatever changed while we were not subscribed is read now.
                self.request_reload()
                backoff.reset()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is not None:
                        self._on_message(message["channel"], message["data"])
            except (redis.exceptions.RedisError, OSError) as exc:
                delay = backoff.next()
                log.warning("alert channels lost, resubscribing", error=str(exc), retry_in_s=delay)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await client.aclose()
            await asyncio.sleep(delay)

    def _on_message(self, channel: bytes, data: bytes) -> None:
        if channel == self._names.rules_changed.encode():
            self.request_reload()
            return
        try:
            note = _note_decoder.decode(data)
        except msgspec.DecodeError:
            return
        if note.replica != self.replica:
            self.engine.apply_remote(note.kind, note.rule_id, note.device_id, note.ts)

    async def _store_with_retry(self, transitions: list[Transition]) -> None:
        def failed(exc: Exception, delay: float) -> None:
            metrics.ALERT_STORE_RETRIES.inc()
            log.warning("storing alert transitions failed, retrying", error=str(exc), retry_in_s=delay)

        try:
            changes = await retry(
                lambda: self._store(transitions),
                Backoff(RETRY_INITIAL_S, RETRY_MAX_S),
                retry_on=lambda exc: not isinstance(exc, DATA_ERRORS),
                on_retry=failed,
            )
        except DATA_ERRORS as exc:
            metrics.ALERT_ERRORS.labels("refused").inc()
            log.error("alert transitions refused by PostgreSQL, dropped", error=str(exc))
            return
        await self._publish([(t, record) for t, record, _ in changes], transitions)
        for _, _, job in changes:
            if job is not None and not self._actions.submit(job):
                await self._actions.record_dropped(job)

    async def _store(self, transitions: list[Transition]) -> list[tuple[Transition, Any, ActionJob | None]]:
        """Write opens and resolves in one transaction: the rows really inserted or updated, each with
        the job of its rule's action (its run inserted ``queued`` in the same transaction), if any."""
        changes: list[tuple[Transition, Any, ActionJob | None]] = []
        async with self._pool.acquire() as conn, conn.transaction():
            for t in transitions:
                if t.kind == "open":
                    rule = t.rule
                    record = await conn.fetchrow(
                        OPEN_ALERT,
                        rule.id,
                        t.device_id,
                        rule.metric,
                        rule.severity,
                        rule.message,
                        t.value,
                        rule.threshold,
                        t.ts,
                        rule.tenant_id,
                    )
                elif t.kind == "resolve":
                    record = await conn.fetchrow(RESOLVE_ALERT, t.rule.id, t.device_id, t.ts)
                else:
                    continue
                if record is None:
                    continue
                trigger: Literal["open", "resolve"] = "open" if t.kind == "open" else "resolve"
                action = parse_action(t.rule.action)
                job = None
                if action is not None and trigger in action.on:
                    job = await queue_run(conn, trigger, alert_event(record), action, t.rule.tenant_id)
                changes.append((t, record, job))
        for t, record, _ in changes:
            (metrics.ALERTS_OPENED if t.kind == "open" else metrics.ALERTS_RESOLVED).inc()
            log.info(
                "alert opened" if t.kind == "open" else "alert resolved",
                alert_id=record["id"],
                rule_id=t.rule.id,
                device_id=t.device_id,
                metric=t.rule.metric,
                value=t.value,
            )
        return changes

    async def _publish(self, changes: list[tuple[Transition, Any]], transitions: list[Transition]) -> None:
        """AlertEvents of real changes on the device channels; every transition's note for the replicas."""
        try:
            if as_cluster(self._redis) is not None:
                # Alert events on the shards of their device channels; the notes by classic PUBLISH, which
                # a cluster pipeline does not take (and a cluster copies to every node).
                events = [
                    (t.rule.tenant_id, record["device_id"], encode_event(alert_event(record)))
                    for t, record in changes
                ]
                await publish_device_events(self._redis, self._names, events)
                for t in transitions:
                    note = SyncNote(self.replica, t.kind, t.rule.id, t.device_id, t.ts)
                    await self._redis.publish(self._names.alert_sync, _note_encoder.encode(note))
                return
            async with self._redis.pipeline(transaction=False) as pipe:
                for t, record in changes:
                    channel = self._names.device_channel(t.rule.tenant_id, record["device_id"])
                    pipe.publish(channel, encode_event(alert_event(record)))
                for t in transitions:
                    note = SyncNote(self.replica, t.kind, t.rule.id, t.device_id, t.ts)
                    pipe.publish(self._names.alert_sync, _note_encoder.encode(note))
                await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            metrics.ALERT_ERRORS.labels("publish").inc()
            log.warning(
                "publishing alert events failed; alerts are stored", error=str(exc), changes=len(changes)
            )
