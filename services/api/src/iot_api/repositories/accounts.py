"""Users and API keys, each of one tenant.

A login names no tenant, so the look-ups of authentication (:meth:`AccountRepository.user_by_email`,
:meth:`AccountRepository.user_by_id`) are global; every other statement names the tenant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from iot_api.repositories.sql import Query
from iot_api.schemas.accounts import ApiKey, User
from iot_common.tenancy import DEFAULT_TENANT_ID, Role

_KEY_COLUMNS = (
    "id::text AS id, tenant_id::text AS tenant_id, name, prefix, scopes, created_by::text AS created_by,"
    " created_at, last_used_at, revoked_at"
)
_USER_COLUMNS = (
    "id::text AS id, tenant_id::text AS tenant_id, email, role, platform_admin,"
    " disabled_at IS NOT NULL AS disabled, created_at"
)


@dataclass(frozen=True)
class UserRow:
    """A user as authentication needs it (with the password hash: never for a response)."""

    id: UUID
    email: str
    password_hash: str
    role: Role
    disabled: bool
    tenant_id: UUID
    platform_admin: bool


class AccountRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    # Authentication: by e-mail or id, in any tenant.

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

    # Users of a tenant.

    async def user_of(self, tenant_id: UUID, user_id: UUID) -> User | None:
        row = await self.pool.fetchrow(
            f"SELECT {_USER_COLUMNS} FROM users WHERE tenant_id = $1 AND id = $2", tenant_id, user_id
        )
        return None if row is None else User(**row)

    async def create_user(self, tenant_id: UUID, email: str, password_hash: str, role: Role) -> User | None:
        """A new user of the tenant; None when the e-mail is taken (in any tenant)."""
        row = await self.pool.fetchrow(
            f"""
            INSERT INTO users (tenant_id, email, password_hash, role) VALUES ($1, $2, $3, $4)
            ON CONFLICT (lower(email)) DO NOTHING RETURNING {_USER_COLUMNS}
            """,
            tenant_id,
            email,
            password_hash,
            role,
        )
        return None if row is None else User(**row)

    async def list_users(self, tenant_id: UUID, *, after: tuple[Any, ...] | None, limit: int) -> list[User]:
        """The tenant's users, oldest first, after the position ``after`` (created_at, id)."""
        query = Query(tenant_id)
        query.where("tenant_id = $1")
        query.after(("created_at", "users.id"), after, descending=False)
        rows = await self.pool.fetch(
            f"SELECT {_USER_COLUMNS} FROM users {query.sql()}"
            f" ORDER BY created_at, users.id LIMIT {query.arg(limit)}",
            *query.args,
        )
        return [User(**r) for r in rows]

    async def update_user(self, tenant_id: UUID, user_id: UUID, changes: dict[str, Any]) -> User | None:
        """Set ``changes`` (``role``, ``password_hash``, ``disabled``: names from the service); None when the
        user is not the tenant's."""
        columns = dict(changes)
        disabled = columns.pop("disabled", None)
        query = Query(tenant_id, user_id)
        assignments = [query.assignments(columns)] if columns else []
        if disabled is not None:
            assignments.append(
                f"disabled_at = CASE WHEN {query.arg(disabled)} THEN coalesce(disabled_at, now()) END"
            )
        row = await self.pool.fetchrow(
            f"UPDATE users SET {', '.join(assignments)} WHERE tenant_id = $1 AND id = $2"
            f" RETURNING {_USER_COLUMNS}",
            *query.args,
        )
        return None if row is None else User(**row)

    async def delete_user(self, tenant_id: UUID, user_id: UUID) -> list[str] | None:
        """Delete the tenant's user and revoke the API keys it created (a key never outlives the role
        that caps it); the prefixes of those keys, or None when there is no such user."""
        async with self.pool.acquire() as conn, conn.transaction():
            prefixes = await conn.fetch(
                """
                UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
                WHERE created_by = $2 AND EXISTS (SELECT 1 FROM users WHERE tenant_id = $1 AND id = $2)
                RETURNING prefix
                """,
                tenant_id,
                user_id,
            )
            status = await conn.execute(
                "DELETE FROM users WHERE tenant_id = $1 AND id = $2", tenant_id, user_id
            )
            if not status.endswith(" 1"):
                return None
        return [r["prefix"] for r in prefixes]

    async def key_prefixes_created_by(self, user_id: UUID) -> list[str]:
        """Prefixes of the keys a user created (whose cached verification a change of the user outdates)."""
        rows = await self.pool.fetch("SELECT prefix FROM api_keys WHERE created_by = $1", user_id)
        return [r["prefix"] for r in rows]

    # API keys of a tenant.

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
        return None if row is None else ApiKey(**row)

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

    async def list_keys(self, tenant_id: UUID) -> list[ApiKey]:
        rows = await self.pool.fetch(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1 ORDER BY created_at, id", tenant_id
        )
        return [ApiKey(**r) for r in rows]

    async def revoke_key(self, tenant_id: UUID, key_id: UUID) -> ApiKey | None:
        """Mark the tenant's key revoked (keeping the first revocation time); None when it is not the
        tenant's."""
        row = await self.pool.fetchrow(
            f"""
            UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE tenant_id = $1 AND id = $2
            RETURNING {_KEY_COLUMNS}
            """,
            tenant_id,
            key_id,
        )
        return None if row is None else ApiKey(**row)

    async def touch_key(self, key_id: UUID) -> None:
        """Record use, at most once a minute per key, so that hot keys do not write on every request."""
        await self.pool.execute(
            """
            UPDATE api_keys SET last_used_at = now()
            WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')
            """,
            key_id,
        )
