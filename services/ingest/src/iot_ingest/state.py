"""Device state, ingest's side: re-publishing a device's desired state when it comes online.

The desired message is retained (``devices/state/{id}/desired``), so a device gets it whenever it
subscribes. When a device announces ``online`` on ``devices/status/{id}``, ingest publishes it once more
(after the status is committed), for a device that keeps a persistent session and does not subscribe
again. Each publication re-reads the row under the device's advisory lock
(:func:`iot_common.state.publish_desired`), so it never sends an older version than the retained one.

Reports (``devices/state/{id}/reported``) are stored by the writer in the batch transaction
(:meth:`iot_ingest.writer.BatchWriter._apply_reports`) and published by :mod:`iot_ingest.redis_output`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Final

import asyncpg
import structlog
from prometheus_client import Counter

from iot_common.mqtt import PublishError
from iot_common.state import Publish, publish_desired

log = structlog.stdlib.get_logger(__name__)
REPUBLISHED = Counter(
    "iot_ingest_desired_state_republished_total",
    "Desired states published again because their device came online, by outcome",
    ["outcome"],
)
QUEUE_SIZE: Final = 10_000


class DesiredRepublisher:
    """Publishes the desired state of devices that came online, one device at a time, off the message
    path (a PUBACK never waits for it). Bounded: past ``queue_size`` waiting devices, more are dropped
    and counted (those devices still get the retained message when they subscribe)."""

    def __init__(self, pool: asyncpg.Pool[Any], publish: Publish, queue_size: int = QUEUE_SIZE) -> None:
        self._pool = pool
        self._publish = publish
        self._queue: asyncio.Queue[str] = asyncio.Queue(queue_size)

    def submit(self, device_ids: list[str]) -> None:
        """Queue ``device_ids`` (devices whose ``online`` status was just committed)."""
        for device_id in device_ids:
            try:
                self._queue.put_nowait(device_id)
            except asyncio.QueueFull:
                REPUBLISHED.labels("dropped").inc()

    async def run(self) -> None:
        """Work through the queue until cancelled."""
        while True:
            device_id = await self._queue.get()
            await self.republish_desired([device_id])

    async def republish_desired(self, device_ids: list[str]) -> None:
        """Publish each device's current desired state (devices that never had one are skipped); a
        failure is logged and counted, never raised."""
        try:
            count = await publish_desired(self._pool, device_ids, self._publish)
            REPUBLISHED.labels("published").inc(count)
        except (PublishError, OSError, asyncpg.PostgresError) as exc:
            REPUBLISHED.labels("failed").inc()
            log.warning(
                "desired state not re-published",
                devices=device_ids[:10],
                error=f"{type(exc).__name__}: {exc}",
            )


def online_devices(statuses: Mapping[str, tuple[str, Any]]) -> list[str]:
    """The devices whose last status in a committed batch is ``online``."""
    return [device_id for device_id, (status, _) in statuses.items() if status == "online"]
