"""Device state, ingest's side: re-publishing a device's desired state when it comes online.

The desired message is retained (``devices/state/{id}/desired``), so a device gets it whenever it
subscribes. When a device comes online (an ``online`` status, or a reading while it was marked offline),
ingest publishes it once more (after the batch is committed), for a device that keeps a persistent session
and does not subscribe again. Each publication re-reads the row under the device's advisory lock
(:func:`iot_common.state.publish_desired`), so it never sends an older version than the retained one.

Reports (``devices/state/{id}/reported``) are stored by the writer in the batch transaction
(:meth:`iot_ingest.writer.BatchWriter._apply_reports`) and published by :mod:`iot_ingest.redis_output`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


class DesiredRepublisher:
    """Publishes the desired state of devices that came online: a "device came online" hook
    (:mod:`iot_ingest.presence`), run off the message path (a PUBACK never waits for it)."""

    def __init__(self, pool: asyncpg.Pool[Any], publish: Publish) -> None:
        self._pool = pool
        self._publish = publish

    async def republish_desired(self, device_ids: Sequence[str]) -> None:
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
