"""Users and API keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from iot_api.schemas.accounts import ApiKey

_KEY_COLUMNS = "id, name, prefix, scopes, created_at, last_used_at, revoked_at"


@dataclass(frozen=True)
class UserRow:
    id: UUID
    email: str
    password_hash: str
    role: str
    disabled: bool


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
            "SELECT id, email, password_hash, role, disabled_at IS NOT NULL AS disabled"
            f" FROM users WHERE {condition}",
            value,
        )
        return None if row is None else UserRow(**row)

    async def set_password_hash(self, user_id: UUID, password_hash: str) -> None:
        await self.pool.execute("UPDATE users SET password_hash = $2 WHERE id = $1", user_id, password_hash)

    async def ensure_user(self, email: str, password_hash: str, role: str) -> bool:
        """Create the user unless one with this e-mail exists; True when created."""
        status = await self.pool.execute(
            """
            INSERT INTO users (email, password_hash, role) VALUES ($1, $2, $3)
            ON CONFLICT (lower(email)) DO NOTHING
            """,
            email,
            password_hash,
            role,
        )
        return status.endswith(" 1")

    async def create_key(
        self, name: str, prefix: str, key_hash: str, scopes: list[str], created_by: UUID | None
    ) -> ApiKey | None:
        """Insert a key; None when the prefix is taken."""
        row = await self.pool.fetchrow(
            f"""
            INSERT INTO api_keys (name, prefix, key_hash, scopes, created_by) VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (prefix) DO NOTHING RETURNING {_KEY_COLUMNS}
            """,
            name,
            prefix,
            key_hash,
            scopes,
            created_by,
        )
        return None if row is None else _api_key(row)

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
