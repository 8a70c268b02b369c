"""What happens when devices come online: after a batch that set devices ``online`` is committed, the
"device came online" hooks run in the background with the ids of those devices.

A hook is an async callable taking the device ids (:data:`OnlineHook`); the hooks of one batch run one
after the other, batch after batch (in commit order), after the batch's Redis step (so a device's
``status`` event precedes what its hooks publish). A hook that raises is logged and counted, and the next
hooks still run. A device counts as come online when a batch carries its ``online`` status message, or a
reading while it is marked ``offline`` (see :mod:`iot_ingest.writer`).

:class:`QueueFlush` is the first hook: it publishes the device's ``queued`` commands in creation order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions as redis_exceptions
import structlog

from iot_common.commands import (
    LOCK_DEVICE_QUEUE,
    QUEUE_LOCK_CLASS,
    UNLOCK_DEVICE_QUEUE,
    claim_queued,
    command_event,
    command_publication,
    mark_failed,
    mark_sent,
    publish_command_event,
    requeue,
)
from iot_common.mqtt import PublishRefused
from iot_common.topics import RedisNames
from iot_ingest import metrics

log = structlog.stdlib.get_logger(__name__)

OnlineHook = Callable[[Sequence[str]], Awaitable[None]]
"""A "device came online" hook: called with the ids of the devices a committed batch set online."""

MqttPublish = Callable[[str, bytes], Awaitable[None]]
"""Publish at QoS 1 and wait for the broker's PUBACK (the consumer's connection)."""

FLUSH_CONCURRENCY: Final = 8
"""Devices whose queues one batch's flush publishes at the same time."""


class Presence:
    """Runs the hooks of each committed batch in the background, one batch after another."""

    def __init__(self, hooks: Sequence[OnlineHook]) -> None:
        self.hooks = list(hooks)
        self._tail: asyncio.Task[None] | None = None

    def submit(self, device_ids: Sequence[str], after: asyncio.Task[None] | None = None) -> None:
        """Run the hooks for ``device_ids`` once ``after`` (the batch's Redis step) and the previous batch's
        hooks are done."""
        if not device_ids or not self.hooks:
            return
        previous = self._tail
        self._tail = asyncio.create_task(self._run(list(device_ids), previous, after))

    async def drain(self) -> None:
        """Wait for the hooks of every submitted batch."""
        while self._tail is not None and not self._tail.done():
            await asyncio.wait([self._tail])

    async def _run(
        self, device_ids: list[str], previous: asyncio.Task[None] | None, after: asyncio.Task[None] | None
    ) -> None:
        for task in (after, previous):
            if task is not None:
                with contextlib.suppress(Exception):
                    await task
        for hook in self.hooks:
            name = getattr(hook, "__name__", type(hook).__name__)
            try:
                await hook(device_ids)
            except Exception as exc:
                metrics.ONLINE_HOOK_ERRORS.labels(name).inc()
                log.error(
                    "device online hook failed", hook=name, devices=device_ids[:20], error=repr(exc)[:500]
                )


class QueueFlush:
    """Publish the ``queued`` commands of devices that came online, oldest first.

    For each device, under its queue lock (a PostgreSQL session advisory lock, also taken by the API
    while it decides to queue; held for the whole flush, so two replicas never interleave one device's
    commands): claim the oldest queued command whose deadline has not passed (``queued`` -> ``pending``,
    one UPDATE, so a command is claimed once whatever the number of replicas), publish it at QoS 1 and
    wait for the PUBACK, then mark it ``sent``; a ``command`` event goes out at each change. When the
    broker refuses it (PUBACK reason code >= 0x80, e.g. not authorized) the command is ``failed``, and
    the next one is taken. When it cannot be published (not connected, no PUBACK in time) it goes back
    to ``queued`` with the reason in ``error`` and the device's flush stops, keeping the order: what is
    left goes out when the device comes online again, or expires.
    """

    __name__ = "queue_flush"

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        redis: aioredis.Redis,
        names: RedisNames,
        publish: MqttPublish,
        concurrency: int = FLUSH_CONCURRENCY,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._names = names
        self._publish = publish
        self._slots = asyncio.Semaphore(concurrency)

    async def __call__(self, device_ids: Sequence[str]) -> None:
        results = await asyncio.gather(*(self._guarded(d) for d in device_ids), return_exceptions=True)
        failures = [(d, r) for d, r in zip(device_ids, results, strict=True) if isinstance(r, Exception)]
        if failures:
            raise failures[0][1]

    async def _guarded(self, device_id: str) -> None:
        async with self._slots:
            await self.flush(device_id)

    async def flush(self, device_id: str) -> int:
        """Publish the device's queued commands; the number sent."""
        sent = 0
        async with self._pool.acquire() as conn:
            await conn.execute(LOCK_DEVICE_QUEUE, QUEUE_LOCK_CLASS, device_id)
            try:
                while (row := await claim_queued(conn, device_id)) is not None:
                    tenant_id, command_id = row["tenant_id"], row["id"]
                    topic, payload = command_publication(device_id, row)
                    try:
                        await self._publish(topic, payload)
                    except PublishRefused as exc:
                        error = f"not published: {exc}"
                        metrics.QUEUED_COMMANDS.labels("failed").inc()
                        await self._event(tenant_id, await mark_failed(conn, command_id, error))
                        continue
                    except Exception as exc:
                        error = f"not published: {type(exc).__name__}: {exc}"[:500]
                        metrics.QUEUED_COMMANDS.labels("requeued").inc()
                        log.warning(
                            "queued command not published, left queued", command_id=command_id, error=error
                        )
                        await self._event(tenant_id, await requeue(conn, command_id, error))
                        break
                    metrics.QUEUED_COMMANDS.labels("sent").inc()
                    sent += 1
                    # None: the device answered before this update; the answer published its own event.
                    await self._event(tenant_id, await mark_sent(conn, command_id))
            finally:
                await conn.execute(UNLOCK_DEVICE_QUEUE, QUEUE_LOCK_CLASS, device_id)
        if sent:
            log.info("queued commands sent", device_id=device_id, count=sent)
        return sent

    async def _event(self, tenant_id: str, row: Any) -> None:
        if row is None:
            return
        try:
            await publish_command_event(self._redis, self._names, tenant_id, command_event(row))
        except (redis_exceptions.RedisError, OSError) as exc:
            log.warning("publishing a command event failed", command_id=row["id"], error=str(exc))
