"""Rule actions (webhooks, commands to devices) run by a few background workers from a bounded queue.

Nothing here is awaited by the ingest path: an alert hands a job to :meth:`ActionRunner.submit`, which
never waits; a full queue drops the job (counted, logged). A webhook target that is down costs a worker
``attempts x timeout`` plus the backoff, never a reading. Every run is recorded in ``action_runs``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

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
    publish_command_event,
)
from iot_common.messages import AlertEvent
from iot_common.mqtt import PublishError
from iot_common.resilience import Backoff, retry
from iot_common.topics import RedisNames
from iot_ingest import metrics

log = structlog.stdlib.get_logger(__name__)

MqttPublish = Callable[[str, bytes], Awaitable[None]]
"""Publishes a payload on a topic at QoS 1 and waits for the PUBACK; raises when the broker is
unreachable, does not acknowledge in time, or refuses the message (``PublishRefused``)."""

INSERT_RUN: Final = """
INSERT INTO action_runs (alert_id, rule_id, trigger, kind, target)
VALUES ($1::uuid, $2::uuid, $3, $4, $5) RETURNING id
"""
FINISH_RUN: Final = """
UPDATE action_runs SET state = $2, attempts = $3, last_error = $4, command_id = $5::uuid, finished_at = now()
WHERE id = $1
"""
RETRYABLE_STATUS: Final = frozenset({408, 425, 429})
ERROR_CHARS: Final = 500
RECORD_ATTEMPTS: Final = 3
RECORD_BACKOFF: Final = Backoff(0.5, 2.0, factor=4)
"""Recording an outcome: three attempts, 0.5 s then 2 s apart."""
_DB_ERRORS: Final = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


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


@dataclass(slots=True)
class Outcome:
    ok: bool
    attempts: int
    error: str | None = None
    command_id: str | None = None


_body_encoder: Final = msgspec.json.Encoder()


class ActionRunner:
    """Runs :class:`ActionJob`s on ``workers`` tasks; each run's outcome goes to ``action_runs``."""

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
    ) -> None:
        self._pool = pool
        self._redis = redis_client
        self._names = names
        self._publish = publish
        self._workers = workers
        self._queue: asyncio.Queue[ActionJob] = asyncio.Queue(queue_size)
        self._timeout = webhook_timeout_s
        self._attempts = webhook_attempts
        # Exponential backoff with jitter, so that many alerts do not retry in step.
        self._backoff = Backoff(webhook_backoff_s, jitter=0.2)
        self._command_ttl = timedelta(seconds=command_ttl_s)

    def submit(self, job: ActionJob) -> bool:
        """Queue ``job`` without waiting; False (counted as ``dropped``) when the queue is full."""
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            metrics.ACTIONS.labels(job.action.__struct_config__.tag, "dropped").inc()
            log.warning(
                "action queue full, action dropped",
                alert_id=job.alert.id,
                rule_id=job.alert.rule_id,
                device_id=job.alert.device_id,
            )
            return False
        metrics.ACTION_QUEUE.set(self._queue.qsize())
        return True

    async def run(self) -> None:
        """Run the workers until cancelled."""
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            workers = [asyncio.create_task(self._work(session)) for _ in range(self._workers)]
            try:
                await asyncio.gather(*workers)
            finally:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)

    async def _work(self, session: aiohttp.ClientSession) -> None:
        while True:
            job = await self._queue.get()
            metrics.ACTION_QUEUE.set(self._queue.qsize())
            try:
                await self.run_one(session, job)
            except Exception:
                log.exception("action failed unexpectedly", alert_id=job.alert.id)
            finally:
                self._queue.task_done()

    async def run_one(self, session: aiohttp.ClientSession, job: ActionJob) -> Outcome:
        """Run one action and record it; returns its outcome."""
        action = job.action
        kind: str = action.__struct_config__.tag  # type: ignore[assignment]
        target = action.url if isinstance(action, WebhookAction) else f"{job.alert.device_id}:{action.name}"
        bound = log.bind(alert_id=job.alert.id, rule_id=job.alert.rule_id, device_id=job.alert.device_id)
        run_id = await self._record_start(job, kind, target)
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
        if run_id is not None:
            await self._record_end(run_id, outcome)
        return outcome

    async def _record_start(self, job: ActionJob, kind: str, target: str) -> Any:
        try:
            async with self._pool.acquire() as conn:
                return await conn.fetchval(
                    INSERT_RUN, job.alert.id, job.alert.rule_id, job.trigger, kind, target
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("could not record an action run; running it anyway", error=str(exc))
            return None

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
                retry_on=lambda exc: isinstance(exc, _DB_ERRORS),
                on_retry=failed,
                attempts=RECORD_ATTEMPTS,
            )
        except _DB_ERRORS as exc:
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
            await publish_command_event(self._redis, self._names, tenant_id, command_event(row))
