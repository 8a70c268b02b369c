"""Fixtures shared by every suite: backing services, an isolated database per test, unique ids."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from iot_common.db import connect
from iot_common.db.migrate import apply_migrations
from iot_common.db.partitions import maintain_partitions
from iot_testkit.backends import MQTT, POSTGRES, REDIS, backend_url, with_database

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

RUN_ORDER_UNDER_XDIST = ("tests/image/", "tests/scale/", "tests/e2e/", "tests/integration/")
"""Where the tests that take longest are: under pytest-xdist (``make test``: ``--dist loadgroup
--no-loadscope-reorder``) the workers take tests in collection order, so these go first: tests/image and
tests/scale (minutes each, isolated: a dockerd and network namespaces of their own) start at once beside
the rest, and the many short tests fill the workers at the end instead of a long one starting last."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: the usual order (fast unit tests are not kept waiting)

    def rank(item: pytest.Item) -> int:
        path = item.nodeid
        return next(
            (i for i, p in enumerate(RUN_ORDER_UNDER_XDIST) if path.startswith(p)), len(RUN_ORDER_UNDER_XDIST)
        )

    items.sort(key=rank)  # stable: the order within each directory is kept


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """URL of the PostgreSQL server's maintenance database, for creating test databases."""
    with backend_url(POSTGRES) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with backend_url(REDIS) as url:
        yield url


@pytest.fixture(scope="session")
def mqtt_url() -> Iterator[str]:
    with backend_url(MQTT) as url:
        yield url


async def _drop_database(admin: asyncpg.Connection[Any], name: str) -> None:
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
async def template_database(postgres_server_url: str) -> AsyncIterator[str]:
    """A database migrated once per session; each test copies it (CREATE DATABASE ... TEMPLATE)."""
    name = f"iot_tpl_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        conn = await connect(with_database(postgres_server_url, name))
        try:
            await apply_migrations(conn)
            await maintain_partitions(conn, retention_days=30, ahead_days=7)
        finally:
            await conn.close()
        yield name
    finally:
        await _drop_database(admin, name)
        await admin.close()


@contextlib.asynccontextmanager
async def copy_of_template(server_url: str, template: str, prefix: str) -> AsyncIterator[str]:
    """URL of a new database copied from ``template`` (CREATE DATABASE ... TEMPLATE), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        yield with_database(server_url, name)
    finally:
        await _drop_database(admin, name)
        await admin.close()


@pytest.fixture
async def database_url(postgres_server_url: str, template_database: str) -> AsyncIterator[str]:
    """URL of a fresh, migrated database that belongs to this test alone."""
    async with copy_of_template(postgres_server_url, template_database, "iot_test") as url:
        yield url


@pytest.fixture
async def empty_database_url(postgres_server_url: str) -> AsyncIterator[str]:
    """URL of a new database with no schema at all."""
    name = f"iot_empty_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield with_database(postgres_server_url, name)
    finally:
        await _drop_database(admin, name)
        await admin.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    conn = await connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def unique() -> str:
    """A short random token for device ids, topics and share groups private to one test."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def artifacts_dir(request: pytest.FixtureRequest) -> Path:
    """Where a test keeps files worth looking at afterwards (logs, screenshots)."""
    path = ARTIFACTS / request.node.name.replace("/", "_")[:80]
    path.mkdir(parents=True, exist_ok=True)
    return path
