"""Fixtures for the API's integration tests: the Litestar app on a fresh database, the shared Redis and
Mosquitto.

Each test gets its own database, its own Redis prefix (``IOT_REDIS_PREFIX``: its keys and pub/sub channels)
and its own cache namespace in Redis, so tests never see each other's cached pages, sessions, rate-limit
counters or events, even when several run at once (``make test``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from iot_api.app import create_app
from iot_api.main import serve
from iot_api.settings import ApiSettings
from iot_common.topics import RedisNames
from iot_testkit.processes import JWT_SECRET, free_port
from iot_testkit.waiting import wait_for

ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "correct horse battery"
BOOTSTRAP_KEY = "iotk_testbootstrp_" + "k" * 24


@pytest.fixture
def api_settings(database_url: str, redis_url: str, mqtt_url: str, unique: str) -> ApiSettings:
    return ApiSettings(
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=f"t{unique}",
        mqtt_url=mqtt_url,
        log_format="json",
        jwt_secret=JWT_SECRET,
        bootstrap_api_key=BOOTSTRAP_KEY,
        bootstrap_admin_email=ADMIN_EMAIL,
        bootstrap_admin_password=ADMIN_PASSWORD,
        api_cache_namespace=f"iot:test:{unique}:",
        api_rollup_interval_s=0,
        cors_origins=["https://dashboard.example.com"],
    )


@pytest.fixture
def redis_names(api_settings: ApiSettings) -> RedisNames:
    """The Redis keys and channels of this test's API (its own ``IOT_REDIS_PREFIX``)."""
    return api_settings.redis_names()


ClientFactory = Callable[..., Any]


@pytest.fixture
async def make_client(api_settings: ApiSettings) -> AsyncIterator[ClientFactory]:
    """Build clients on apps with settings overridden; each is closed (lifespan ended) afterwards."""
    opened: list[AsyncTestClient[Any]] = []

    async def make(**overrides: Any) -> AsyncTestClient[Any]:
        settings = ApiSettings(**{**_fields(api_settings), **overrides})
        client: AsyncTestClient[Any] = AsyncTestClient(app=create_app(settings))
        await client.__aenter__()
        opened.append(client)
        return client

    yield make
    for client in reversed(opened):
        await client.__aexit__(None, None, None)


def _fields(settings: ApiSettings) -> dict[str, Any]:
    return {f: getattr(settings, f) for f in settings.__struct_fields__}


@pytest.fixture
async def client(make_client: ClientFactory) -> AsyncTestClient[Any]:
    """A client without credentials."""
    result: AsyncTestClient[Any] = await make_client()
    return result


@pytest.fixture
def admin() -> dict[str, str]:
    """Headers of the bootstrap admin API key."""
    return {"X-API-Key": BOOTSTRAP_KEY}


async def make_key(client: AsyncTestClient[Any], admin: dict[str, str], *scopes: str) -> dict[str, str]:
    """Create an API key with ``scopes``; return the headers that use it."""
    response = await client.post(
        "/api/v1/api-keys", json={"name": "test", "scopes": list(scopes)}, headers=admin
    )
    assert response.status_code == 201, response.text
    return {"X-API-Key": response.json()["key"]}


@pytest.fixture
async def reader(client: AsyncTestClient[Any], admin: dict[str, str]) -> dict[str, str]:
    return await make_key(client, admin, "read")


@pytest.fixture
async def writer(client: AsyncTestClient[Any], admin: dict[str, str]) -> dict[str, str]:
    return await make_key(client, admin, "write")


ServerFactory = Callable[..., Any]


@pytest.fixture
async def make_server(api_settings: ApiSettings) -> AsyncIterator[ServerFactory]:
    """Run the API as ``iot-api`` does (uvicorn, :func:`iot_api.main.serve`) in this process on a free
    port of 127.0.0.1, with settings overridden; return its base URL. Stopped afterwards."""
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def make(**overrides: Any) -> str:
        port = free_port()
        settings = ApiSettings(**{**_fields(api_settings), "api_port": port, **overrides})
        stop = asyncio.Event()
        task = asyncio.create_task(serve(settings, stop))
        running.append((stop, task))
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as probe:

            async def ready() -> bool:
                assert not task.done(), "the API stopped while starting"
                with contextlib.suppress(httpx.TransportError):
                    return (await probe.get("/readyz")).status_code == 200
                return False

            await wait_for(ready, 30, "the API to be ready")
        return base

    yield make
    for stop, task in reversed(running):
        stop.set()
        await task
