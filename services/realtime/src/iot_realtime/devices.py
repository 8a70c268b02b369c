"""Which device ids exist in a tenant: subscriptions are accepted only for devices registered in
PostgreSQL in the connection's tenant (a device of another tenant is as unknown as one that does not exist).

Found ids are remembered for ``IOT_REALTIME_DEVICE_CACHE_S`` (bounded, oldest evicted first), so a
dashboard that reconnects and resubscribes costs no query. Unknown ids are not cached: a device registered a
moment ago can be subscribed at once (and a cache would not help against a client naming new random ids
each time). Each subscribe frame with ids not remembered costs one indexed query for at most 1,000 ids (the
frame's limit); the gateway lets each credential send at most ``IOT_REALTIME_DEVICE_CHECKS_PER_MINUTE`` such
frames (see :meth:`KnownDevices.uncached`), which bounds the queries one credential can cause.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import asyncpg

MAX_CACHED = 100_000
"""Known device ids remembered at most (about 100 bytes each)."""


class KnownDevices:
    """Existence of device ids, from the ``devices`` table, with a small cache of the ids found."""

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        ttl_s: float,
        *,
        max_cached: int = MAX_CACHED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._ttl_s = ttl_s
        self._max_cached = max_cached
        self._clock = clock
        self._expiry: dict[tuple[str, str], float] = {}
        """(tenant id, device id) -> until when that device is known to be in that tenant."""

    def uncached(self, tenant_id: str, device_ids: Sequence[str]) -> list[str]:
        """The ids of ``device_ids`` that :meth:`unknown` would ask PostgreSQL about."""
        now = self._clock()
        return [d for d in device_ids if self._expiry.get((tenant_id, d), 0.0) <= now]

    async def unknown(self, tenant_id: str, device_ids: Sequence[str]) -> list[str]:
        """The ids of ``device_ids`` that are not registered in ``tenant_id`` (raises asyncpg/OS errors
        when the database cannot be asked)."""
        now = self._clock()
        missing = self.uncached(tenant_id, device_ids)
        if not missing:
            return []
        rows = await self._pool.fetch(
            "SELECT id FROM devices WHERE tenant_id = $1::uuid AND id = ANY($2::text[])", tenant_id, missing
        )
        found = {row["id"] for row in rows}
        if self._ttl_s > 0:
            for device_id in missing:  # in the order asked, so the oldest are evicted first
                if device_id in found:
                    self._remember((tenant_id, device_id), now + self._ttl_s)
        return [d for d in missing if d not in found]

    def _remember(self, key: tuple[str, str], expiry: float) -> None:
        self._expiry.pop(key, None)
        while len(self._expiry) >= self._max_cached:
            del self._expiry[next(iter(self._expiry))]
        self._expiry[key] = expiry
