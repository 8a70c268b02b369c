"""Rule actions (webhooks, commands to devices) run in the background, in order per rule and device.

Nothing here is awaited by the ingest path: the alert transaction that opens or resolves an alert also
inserts the action's run (``action_runs``, state ``queued``, see :func:`queue_run`), and the alert worker
hands the job to :meth:`ActionRunner.submit`, which never waits; when too many jobs wait, the job is
dropped (counted, logged, its run marked failed).

Order: jobs are keyed by rule and device (:class:`iot_ingest.ordering.KeyedLanes`), so on one replica the
``resolve`` action of an alert starts only after its ``open`` action has finished, and the next alert's
actions only after those. Another replica may have triggered the earlier action (the MQTT shared
subscription hands a device's readings to the replicas in turn): before it runs, a job therefore also
waits while an earlier run of the same rule and device is still ``queued`` or ``running`` in
``action_runs``, for at most :meth:`ActionRunner.longest_run_s` per state (a run left behind by a replica
that died is not waited for longer). A webhook target that is down costs its lane ``attempts x timeout``
plus the backoff, never a reading and never another rule or device.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal

import aiohttp
import asyncpg
import msgspec
import redis.asyncio as aioredis
import redis.exceptions
import structlog

from iot_common.alerts import Action, CommandAction, Trigger, WebhookAction
from iot_common.commands import (
    command_event,
    command_publication,
    create_command,
    mark_failed,
    mark_sent,
)
from iot_common.messages import AlertEvent, encode_event
from iot_common.mqtt import PublishError
from iot_common.redis_client import publish_device_events
from iot_common.resilience import Backoff, retry
from iot_common.topics import RedisNames
from iot_ingest import metrics
from iot_ingest.ordering import KeyedLanes

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

log = structlog.stdlib.get_logger(__name__)

MqttPublish = Callable[[str, bytes], Awaitable[None]]
"""Publishes a payload on a topic at QoS 1 and waits for the PUBACK; raises when the broker is
unreachable, does not acknowledge in time, or refuses the message (``PublishRefused``)."""

QUEUE_RUN: Final = """
INSERT INTO action_runs (alert_id, rule_id, trigger, kind, target, state)
VALUES ($1::uuid, $2::uuid, $3, $4, $5, 'queued') RETURNING id
"""
START_RUN: Final = "UPDATE action_runs SET state = 'running', started_at = now() WHERE id = $1"
FINISH_RUN: Final = """
UPDATE action_runs SET state = $2, attempts = $3, last_error = $4, command_id = $5::uuid, finished_at = now()
WHERE id = $1
"""
GIVE_UP_RUNS: Final = """
UPDATE action_runs SET state = 'failed', last_error = 'not run: the service stopped', finished_at = now()
WHERE id = ANY($1::uuid[]) AND state = 'queued'
"""
EARLIER_UNFINISHED: Final = """
SELECT count(*) FROM action_runs me
JOIN alerts my_alert ON my_alert.id = me.alert_id
JOIN action_runs r ON r.rule_id = me.rule_id AND r.seq < me.seq
JOIN alerts a ON a.id = r.alert_id AND a.device_id = my_alert.device_id
WHERE me.id = $1 AND r.state IN ('queued', 'running')
  AND coalesce(r.started_at, r.created_at) > now() - make_interval(secs => $2)
"""
"""Earlier runs of the same rule and device still queued or running, and not older than ``$2`` s in that
state (older ones were left behind by a replica that stopped). ``seq`` is drawn when the run is inserted,
in the alert's transaction: an alert's resolve (or the next alert's open) can only be written once the
transaction of its open (or of the previous resolve) has committed, so its run always has the higher
``seq``, whichever replicas wrote them."""
RETRYABLE_STATUS: Final = frozenset({408, 425, 429})
ERROR_CHARS: Final = 500
RECORD_ATTEMPTS: Final = 3
RECORD_BACKOFF: Final = Backoff(0.5, 2.0, factor=4)
"""Recording an outcome: three attempts, 0.5 s then 2 s apart."""
RECORD_GRACE_S: Final = 5.0
"""Beyond its attempts, what a run may take to record its outcome (``_record_end`` retries for 2.5 s)."""
POLL_BACKOFF: Final = Backoff(0.05, 1.0)
"""Between checks for an earlier run of the same rule and device: 50 ms doubling to 1 s."""
DB_ERRORS: Final = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class WebhookBody(msgspec.Struct, frozen=True):
    """What a webhook receives: ``event`` is ``alert.opened`` or ``alert.resolved``."""

    event: Literal["alert.opened", "alert.resolved"]
    alert: AlertEvent


@dataclass(frozen=True, slots=True)
class ActionJob:
    trigger: Trigger
    alert: AlertEvent
    action: Action
    tenant_id: str
    """The tenant of the rule (and of the alert's device): where a command's events are published."""
    run_id: Any
    """The job's row in ``action_runs`` (inserted ``queued`` by :func:`queue_run`)."""

    @property
    def key(self) -> tuple[str, str]:
        """Jobs of one key run in order: the rule and the device."""
        return (self.alert.rule_id, self.alert.device_id)


@dataclass(slots=True)
class Outcome:
    ok: bool
    attempts: int
    error: str | None = None
    command_id: str | None = None


_body_encoder: Final = msgspec.json.Encoder()


def action_target(action: Action, device_id: str) -> tuple[str, str]:
    """``kind`` and ``target`` of a run: ``webhook`` and the URL, or ``command`` and ``device:name``."""
    if isinstance(action, WebhookAction):
        return "webhook", action.url
    return "command", f"{device_id}:{action.name}"


async def queue_run(
    conn: asyncpg.Connection[Any] | PoolConnectionProxy[Any],
    trigger: Trigger,
    alert: AlertEvent,
    action: Action,
    tenant_id: str,
) -> ActionJob:
    """Insert the ``queued`` run of ``action`` for ``alert``; call it in the transaction that opens or
    resolves the alert, so that every replica sees the run once it sees the alert's change."""
    kind, target = action_target(action, alert.device_id)
    run_id = await conn.fetchval(QUEUE_RUN, alert.id, alert.rule_id, trigger, kind, target)
    return ActionJob(trigger, alert, action, tenant_id, run_id)


class ActionRunner:
    """Runs :class:`ActionJob`s, ``workers`` at once and in order per rule and device (module doc)."""

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        redis_client: aioredis.Redis,
        publish: MqttPublish,
        *,
        names: RedisNames,
        workers: int,
        queue_size: int,
        webhook_timeout_s: float,
        webhook_attempts: int,
        webhook_backoff_s: float,
        command_ttl_s: int,
        command_puback_timeout_s: float,
    ) -> None:
        self._pool = pool
        self._redis = redis_client
        self._names = names
        self._publish = publish
        self._lanes: KeyedLanes[tuple[str, str], ActionJob] = KeyedLanes(
            self._run_job, concurrency=workers, capacity=queue_size, before=self.wait_for_earlier
        )
        self._timeout = webhook_timeout_s
        self._attempts = webhook_attempts
        # Exponential backoff with jitter, so that many alerts do not retry in step.
        self._backoff = Backoff(webhook_backoff_s, jitter=0.2)
        self._command_ttl = timedelta(seconds=command_ttl_s)
        self._command_s = 2 * command_puback_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._started = asyncio.Event()
        self._held = 0

    def longest_run_s(self) -> float:
        """The longest one run can stay ``running``: every webhook attempt timing out, the backoffs at
        their +20 % jitter (or a command's connection wait and PUBACK), plus recording the outcome."""
        backoffs = sum(self._backoff.longest(n) for n in range(1, self._attempts))
        webhook = self._attempts * self._timeout + backoffs
        return max(webhook, self._command_s) + RECORD_GRACE_S

    def submit(self, job: ActionJob) -> bool:
        """Queue ``job`` without waiting; False (counted as ``dropped``) when the queue is full: the
        caller then records the run as failed (:meth:`record_dropped`)."""
        if not self._lanes.submit(job.key, job):
            metrics.ACTIONS.labels(job.action.__struct_config__.tag, "dropped").inc()
            log.warning(
                "action queue full, action dropped",
                alert_id=job.alert.id,
                rule_id=job.alert.rule_id,
                device_id=job.alert.device_id,
            )
            return False
        metrics.ACTION_QUEUE.set(self._lanes.waiting)
        return True

    async def record_dropped(self, job: ActionJob) -> None:
        """Mark the run of a job :meth:`submit` refused as failed, so that nothing waits for it."""
        await self._record_end(job.run_id, Outcome(False, 0, "not run: the action queue is full"))

    async def run(self) -> None:
        """Provide the HTTP session to the lanes until cancelled; jobs not finished then are not run."""
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self._session = session
            self._started.set()
            try:
                await asyncio.get_running_loop().create_future()
            finally:
                left = await self._lanes.aclose()
                if left:
                    await self._give_up(left)

    async def _give_up(self, jobs: list[ActionJob]) -> None:
        """At shutdown: the runs that never started are failed, so that no replica waits for them."""
        log.warning("actions not run: the service stops", count=len(jobs))
        try:
            async with asyncio.timeout(2.0), self._pool.acquire() as conn:
                await conn.execute(GIVE_UP_RUNS, [job.run_id for job in jobs])
        except DB_ERRORS as exc:
            log.warning("could not record the actions not run", error=str(exc))

    async def wait_for_earlier(self, job: ActionJob) -> None:
        """Return once no earlier run of the job's rule and device is queued or running on any replica
        (bounded: see :data:`EARLIER_UNFINISHED`); an unreachable database ends the wait."""
        horizon = self.longest_run_s()
        checks = 0
        held = False
        try:
            while True:
                try:
                    async with self._pool.acquire() as conn:
                        earlier = await conn.fetchval(EARLIER_UNFINISHED, job.run_id, horizon)
                except DB_ERRORS as exc:
                    log.warning("could not check earlier action runs; running it now", error=str(exc))
                    return
                if not earlier:
                    return
                if not held:
                    held = True
                    self._held += 1
                    metrics.ACTIONS_HELD.set(self._held)
                    log.info(
                        "action waits for an earlier action of the same rule and device",
                        alert_id=job.alert.id,
                        rule_id=job.alert.rule_id,
                        device_id=job.alert.device_id,
                        trigger=job.trigger,
                    )
                checks += 1
                await asyncio.sleep(POLL_BACKOFF.delay(checks))
        finally:
            if held:
                self._held -= 1
                metrics.ACTIONS_HELD.set(self._held)

    async def _run_job(self, job: ActionJob) -> None:
        metrics.ACTION_QUEUE.set(self._lanes.waiting)
        await self._started.wait()
        assert self._session is not None
        try:
            await self.run_one(self._session, job)
        except Exception:
            log.exception("action failed unexpectedly", alert_id=job.alert.id)

    async def run_one(self, session: aiohttp.ClientSession, job: ActionJob) -> Outcome:
        """Run one action and record it; returns its outcome."""
        action = job.action
        kind, target = action_target(action, job.alert.device_id)
        bound = log.bind(alert_id=job.alert.id, rule_id=job.alert.rule_id, device_id=job.alert.device_id)
        await self._record_start(job.run_id)
        if isinstance(action, WebhookAction):
            outcome = await self._webhook(session, job, action)
        else:
            outcome = await self._command(job, action)
        metrics.ACTIONS.labels(kind, "succeeded" if outcome.ok else "failed").inc()
        if outcome.ok:
            bound.info("action succeeded", kind=kind, target=target, attempts=outcome.attempts)
        else:
            bound.warning(
                "action failed", kind=kind, target=target, attempts=outcome.attempts, error=outcome.error
            )
        await self._record_end(job.run_id, outcome)
        return outcome

    async def _record_start(self, run_id: Any) -> None:
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(START_RUN, run_id)
        except DB_ERRORS as exc:
            log.warning("could not record an action run's start; running it anyway", error=str(exc))

    async def _record_end(self, run_id: Any, outcome: Outcome) -> None:
        state = "succeeded" if outcome.ok else "failed"
        error = None if outcome.error is None else outcome.error[:ERROR_CHARS]

        async def record() -> None:
            async with self._pool.acquire() as conn:
                await conn.execute(FINISH_RUN, run_id, state, outcome.attempts, error, outcome.command_id)

        def failed(exc: Exception, _delay: float = 0.0) -> None:
            log.warning("could not record an action outcome", run_id=str(run_id), error=str(exc))

        try:
            await retry(
                record,
                RECORD_BACKOFF,
                retry_on=lambda exc: isinstance(exc, DB_ERRORS),
                on_retry=failed,
                attempts=RECORD_ATTEMPTS,
            )
        except DB_ERRORS as exc:
            failed(exc)

    async def _webhook(
        self, session: aiohttp.ClientSession, job: ActionJob, action: WebhookAction
    ) -> Outcome:
        event: Literal["alert.opened", "alert.resolved"] = (
            "alert.opened" if job.trigger == "open" else "alert.resolved"
        )
        body = _body_encoder.encode(WebhookBody(event, job.alert))
        headers = {"Content-Type": "application/json", **action.headers}
        error = ""
        for attempt in range(1, self._attempts + 1):
            try:
                async with session.post(action.url, data=body, headers=headers) as response:
                    if 200 <= response.status < 300:
                        return Outcome(True, attempt)
                    error = f"HTTP {response.status}"
                    if response.status < 500 and response.status not in RETRYABLE_STATUS:
                        return Outcome(False, attempt, error)
            except TimeoutError:
                error = f"timed out after {self._timeout}s"
            except aiohttp.ClientError as exc:
                error = f"{type(exc).__name__}: {exc}"
            if attempt < self._attempts:
                await asyncio.sleep(self._backoff.delay(attempt))
        return Outcome(False, self._attempts, error)

    async def _command(self, job: ActionJob, action: CommandAction) -> Outcome:
        device_id = job.alert.device_id
        ttl = timedelta(seconds=action.expires_s) if action.expires_s else self._command_ttl
        try:
            async with self._pool.acquire() as conn:
                row = await create_command(
                    conn, device_id, action.name, action.params, datetime.now(UTC) + ttl
                )
                command_id: str = row["id"]
                topic, payload = command_publication(device_id, row)
                try:
                    await self._publish(topic, payload)
                except PublishError as exc:
                    # e.g. "broker refused: not authorized (135)" or "no PUBACK ... within 5 s"
                    error = str(exc)
                    updated = await mark_failed(conn, command_id, error)
                    await self._publish_event(job.tenant_id, updated or row)
                    return Outcome(False, 1, error, command_id)
                except Exception as exc:
                    error = f"not published: {type(exc).__name__}: {exc}"
                    updated = await mark_failed(conn, command_id, error)
                    await self._publish_event(job.tenant_id, updated or row)
                    return Outcome(False, 1, error, command_id)
                updated = await mark_sent(conn, command_id)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return Outcome(False, 1, f"{type(exc).__name__}: {exc}")
        # None: the device answered before the row was marked sent; the ack published its own event.
        if updated is not None:
            await self._publish_event(job.tenant_id, updated)
        return Outcome(True, 1, None, command_id)

    async def _publish_event(self, tenant_id: str, row: Any) -> None:
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            event = command_event(row)
            out = [(tenant_id, event.device_id, encode_event(event))]
            await publish_device_events(self._redis, self._names, out)
