"""Schema migrations: versioned SQL files applied in order, recorded with their checksums.

``iot-migrate`` is idempotent and safe to run concurrently: the whole run holds a session-level advisory
lock, each file is applied in its own transaction, and a file changed after it was applied is refused.
After the schema it creates the telemetry partitions for the retention window and the days ahead.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg
import structlog

from iot_common.db import connect
from iot_common.db.partitions import maintain_partitions
from iot_common.logging import configure_logging
from iot_common.settings import BaseSettings, SettingsError, load_settings
from iot_common.startup import (
    EXIT_FAILURE,
    EXIT_SETTINGS,
    POSTGRES_LOGIN,
    BackendUnavailable,
    exit_unavailable,
    wait_for_backend,
)

MIGRATION_LOCK_KEY = 0x10770001
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
log = structlog.stdlib.get_logger(__name__)


class MigrationError(RuntimeError):
    """The database's recorded migrations disagree with the files shipped."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """The SQL files shipped in ``iot_common/migrations``, in version order."""
    found = []
    for entry in resources.files("iot_common.migrations").iterdir():
        match = _FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions in {versions}")
    return found


async def apply_migrations(
    conn: asyncpg.Connection[Any], migrations: list[Migration] | None = None
) -> list[int]:
    """Apply the migrations not yet recorded; return the versions applied by this call."""
    todo = load_migrations() if migrations is None else migrations
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                checksum text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        recorded = {
            r["version"]: r["checksum"]
            for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        applied = []
        for migration in todo:
            if migration.version in recorded:
                if recorded[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was changed after it "
                        "was applied; add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            log.info("migration applied", version=migration.version, name=migration.name)
            applied.append(migration.version)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def migrate(settings: BaseSettings) -> list[int]:
    """Apply the schema, then create the telemetry partitions the retention window needs."""
    conn = await connect(settings.database_url)
    try:
        applied = await apply_migrations(conn)
        await maintain_partitions(
            conn,
            retention_days=settings.telemetry_retention_days,
            ahead_days=settings.telemetry_partitions_ahead_days,
            wait=True,
        )
        return applied
    finally:
        await conn.close()


def main() -> None:
    """Console script ``iot-migrate``: exit status 2 for bad settings, 10 when PostgreSQL does not answer
    (within ``IOT_STARTUP_WAIT_S``), 1 when a migration fails; see :mod:`iot_common.startup`."""
    try:
        settings = load_settings(BaseSettings)
    except SettingsError as exc:
        print(f"iot-migrate: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_SETTINGS) from None
    configure_logging(settings.log_level, settings.log_format, service="migrate")

    async def run() -> list[int]:
        await wait_for_backend(POSTGRES_LOGIN, settings.database_url, settings.startup_wait_s, log)
        return await migrate(settings)

    try:
        applied = asyncio.run(run())
    except BackendUnavailable as exc:
        exit_unavailable(exc, log)
    except (OSError, asyncpg.PostgresError, MigrationError) as exc:
        log.error("migration failed", error=str(exc))
        raise SystemExit(EXIT_FAILURE) from None
    log.info("schema up to date", applied=applied)
