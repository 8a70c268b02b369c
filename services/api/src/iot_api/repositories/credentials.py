"""Device MQTT credentials (table ``device_credentials``, migration 0005).

Changes name the device's tenant; :meth:`CredentialRepository.get` does not: the broker's hooks ask by
MQTT user name (the device id, unique across tenants)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg


@dataclass(frozen=True)
class CredentialRow:
    device_id: str
    secret_hash: str
    created_at: datetime
    rotated_at: datetime
    revoked_at: datetime | None


_COLUMNS = "device_id, secret_hash, created_at, rotated_at, revoked_at"


class CredentialRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def get(self, device_id: str) -> CredentialRow | None:
        row = await self.pool.fetchrow(
            f"SELECT {_COLUMNS} FROM device_credentials WHERE device_id = $1", device_id
        )
        return None if row is None else CredentialRow(**dict(row))

    async def set_secret(
        self,
        tenant_id: UUID,
        device_id: str,
        secret_hash: str,
        before_commit: Callable[[], Awaitable[None]],
    ) -> bool:
        """Store a new secret hash (re-activating a revoked credential); False when the device is not the
        tenant's.

        ``before_commit`` runs inside the transaction (the broker call): if it raises, nothing changes.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            stored = await conn.fetchval(
                """
                INSERT INTO device_credentials (device_id, secret_hash)
                SELECT id, $2 FROM devices WHERE id = $1 AND tenant_id = $3
                ON CONFLICT (device_id) DO UPDATE
                    SET secret_hash = EXCLUDED.secret_hash, rotated_at = now(), revoked_at = NULL
                RETURNING device_id
                """,
                device_id,
                secret_hash,
                tenant_id,
            )
            if stored is None:
                return False
            await before_commit()
            return True

    async def revoke(
        self, tenant_id: UUID, device_id: str, before_commit: Callable[[], Awaitable[None]]
    ) -> None:
        """Mark the credential of the tenant's device revoked; ``before_commit`` runs in the transaction."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE device_credentials c SET revoked_at = now() FROM devices d"
                " WHERE c.device_id = $1 AND c.revoked_at IS NULL AND d.id = c.device_id"
                " AND d.tenant_id = $2",
                device_id,
                tenant_id,
            )
            await before_commit()
