"""PostgreSQL access shared by the services: pool factory, migrations and telemetry partitions."""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec


async def _init_connection(conn: asyncpg.Connection[Any]) -> None:
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(
            kind,
            encoder=lambda v: msgspec.json.encode(v).decode(),
            decoder=msgspec.json.decode,
            schema="pg_catalog",
        )


async def create_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, **kwargs: Any
) -> asyncpg.Pool[asyncpg.Record]:
    """An asyncpg pool whose connections encode and decode json/jsonb with msgspec."""
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection, **kwargs
    )
    assert pool is not None
    return pool


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection[asyncpg.Record]:
    """A single connection with the same codecs as :func:`create_pool`."""
    conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(dsn, **kwargs)
    await _init_connection(conn)
    return conn
