"""Users and API keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from iot_api.schemas.accounts import ApiKey
from iot_common.tenancy import DEFAULT_TENANT_ID, Role

_KEY_COLUMNS = "id, name, prefix, scopes, created_at, last_used_at, revoked_at"


@dataclass(frozen=True)
class UserRow:
    id: UUID
    email: str
    password_hash: str
    role: Role
    disabled: bool
    tenant_id: UUID
    platform_admin: bool


def _api_key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(**{**row, "id": str(row["id"])})


class AccountRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def user_by_email(self, email: str) -> UserRow | None:
        return await self._user("lower(email) = lower($1)", email)

    async def user_by_id(self, user_id: UUID) -> UserRow | None:
        return await self._user("id = $1", user_id)

    async def _user(self, condition: str, value: object) -> UserRow | None:
        row = await self.pool.fetchrow(
            "SELECT id, email, password_hash, role, disabled_at IS NOT NULL AS disabled, tenant_id,"
            f" platform_admin FROM users WHERE {condition}",
            value,
        )
        return None if row is None else UserRow(**row)

    async def set_password_hash(self, user_id: UUID, password_hash: str) -> None:
        await self.pool.execute("UPDATE users SET password_hash = $2 WHERE id = $1", user_id, password_hash)

    async def ensure_platform_admin(self, email: str, password_hash: str) -> bool:
        """Create the platform admin (in the default tenant) unless a user with this e-mail exists; an
        existing one of the default tenant becomes platform admin. True when created."""
        row = await self.pool.fetchrow(
            """
            INSERT INTO users (email, password_hash, role, tenant_id, platform_admin)
            VALUES ($1, $2, 'admin', $3, true)
            ON CONFLICT (lower(email)) DO UPDATE SET role = 'admin', platform_admin = true
                WHERE users.tenant_id = $3
            RETURNING xmax = 0 AS created
            """,
            email,
            password_hash,
            DEFAULT_TENANT_ID,
        )
        return row is not None and bool(row["created"])

    async def create_key(
        self,
        tenant_id: UUID,
        name: str,
        prefix: str,
        key_hash: str,
        scopes: list[str],
        created_by: UUID | None,
    ) -> ApiKey | None:
        """Insert a key; None when the prefix is taken."""
        row = await self.pool.fetchrow(
            f"""
            INSERT INTO api_keys (tenant_id, name, prefix, key_hash, scopes, created_by)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (prefix) DO NOTHING RETURNING {_KEY_COLUMNS}
            """,
            tenant_id,
            name,
            prefix,
            key_hash,
            scopes,
            created_by,
        )
        return None if row is None else _api_key(row)

    async def ensure_bootstrap_key(self, prefix: str, key_hash: str) -> bool:
        """The platform admin key ``IOT_BOOTSTRAP_API_KEY`` names, in the default tenant: created, or marked
        platform admin when a key with the same prefix and hash exists. True when created."""
        row = await self.pool.fetchrow(
            """
            INSERT INTO api_keys (tenant_id, name, prefix, key_hash, scopes, platform_admin)
            VALUES ($1, 'bootstrap', $2, $3, ARRAY['admin'], true)
            ON CONFLICT (prefix) DO UPDATE SET platform_admin = true
                WHERE api_keys.key_hash = EXCLUDED.key_hash AND api_keys.tenant_id = $1
            RETURNING xmax = 0 AS created
            """,
            DEFAULT_TENANT_ID,
            prefix,
            key_hash,
        )
        return row is not None and bool(row["created"])

    async def list_keys(self) -> list[ApiKey]:
        rows = await self.pool.fetch(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at, id")
        return [_api_key(r) for r in rows]

    async def revoke_key(self, key_id: UUID) -> ApiKey | None:
        """Mark the key revoked (keeping the first revocation time); None when it does not exist."""
        row = await self.pool.fetchrow(
            f"""
            UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
            RETURNING {_KEY_COLUMNS}
            """,
            key_id,
        )
        return None if row is None else _api_key(row)

    async def touch_key(self, key_id: UUID) -> None:
        """Record use, at most once a minute per key, so that hot keys do not write on every request."""
        await self.pool.execute(
            """
            UPDATE api_keys SET last_used_at = now()
            WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')
            """,
            key_id,
        )
