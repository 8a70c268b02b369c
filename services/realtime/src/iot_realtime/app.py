"""Wiring of the realtime service: ``create_app(settings)`` builds the aiohttp application."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from aiohttp import web

from iot_common.db import create_pool
from iot_common.health import Check, redis_check
from iot_common.redis_client import create_redis, is_cluster_url
from iot_common.web import health_routes
from iot_realtime.gateway import GATEWAY, Gateway, websocket_handler
from iot_realtime.hub import Hub, ShardedHub
from iot_realtime.settings import RealtimeSettings

SETTINGS = web.AppKey("settings", RealtimeSettings)
REDIS = web.AppKey("redis", aioredis.Redis)


def create_app(settings: RealtimeSettings) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings
    app.add_routes(health_routes(lambda: _checks(app)))
    app.add_routes([web.get("/ws", websocket_handler)])
    app.cleanup_ctx.append(_gateway_ctx)
    app.on_shutdown.append(_close_connections)
    return app


def _checks(app: web.Application) -> dict[str, Check]:
    gateway = app[GATEWAY]

    async def pubsub() -> None:
        if not gateway.hub.connected.is_set():
            raise ConnectionError("redis pub/sub listener not connected")

    # PostgreSQL is left out on purpose: the pool is opened at start-up, and once running, losing it only
    # makes API-key logins fail (close 1011, retry) while token logins and every open connection keep
    # working, so the replica should stay in the Service.
    return {"redis": redis_check(app[REDIS]), "redis_pubsub": pubsub}


async def _gateway_ctx(app: web.Application) -> AsyncIterator[None]:
    """Redis (snapshots), the PostgreSQL pool (API keys) and the hub's listener, for the app's life."""
    settings = app[SETTINGS]
    app[REDIS] = create_redis(settings.redis_url)
    pool = await create_pool(
        settings.database_url, min_size=settings.database_pool_min, max_size=settings.database_pool_max
    )
    names = settings.redis_names()
    hub = (
        ShardedHub(settings.redis_url, names)
        if is_cluster_url(settings.redis_url)
        else Hub(settings.redis_url, names)
    )
    app[GATEWAY] = Gateway(settings, hub, app[REDIS], pool, names)
    listener = asyncio.create_task(hub.run(), name="redis-listener")
    try:
        yield
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await hub.close()
        await pool.close()
        await app[REDIS].aclose()


async def _close_connections(app: web.Application) -> None:
    await app[GATEWAY].close_all()
