"""The device cache: which device ids are registered (and their types), so that a message costs no query."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import structlog

from iot_ingest import metrics

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[Any] | PoolConnectionProxy[Any]

log = structlog.stdlib.get_logger(__name__)

REGISTER_DEVICES: Final = """
INSERT INTO devices (id) SELECT unnest($1::text[]) ORDER BY 1 ON CONFLICT (id) DO NOTHING RETURNING id
"""


class KnownDevices:
    """The ids and types of registered devices, cached so that a message costs no query.

    Reloaded in full every ``IOT_INGEST_DEVICE_CACHE_S`` (:meth:`refresh`; devices created or deleted
    through the API appear then, and type changes, which alert rules on a device type follow); an id
    missing from the cache is looked up once per batch before it is refused.
    """

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.types: dict[str, str] = {}

    async def load(self, conn: Conn) -> None:
        rows = await conn.fetch("SELECT id, type FROM devices")
        self.types = {row[0]: row[1] for row in rows}
        self.ids = set(self.types)

    async def refresh(self, pool: asyncpg.Pool[Any]) -> None:
        """:meth:`load` on a connection of ``pool`` (the periodic job)."""
        async with pool.acquire() as conn:
            await self.load(conn)

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
