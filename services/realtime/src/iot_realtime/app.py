"""Wiring of the realtime service: ``create_app(settings)`` builds the aiohttp application."""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from aiohttp import web

from iot_common.health import redis_check
from iot_common.web import health_routes
from iot_realtime.settings import RealtimeSettings

SETTINGS = web.AppKey("settings", RealtimeSettings)
REDIS = web.AppKey("redis", aioredis.Redis)


def create_app(settings: RealtimeSettings) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings
    app.add_routes(health_routes(lambda: {"redis": redis_check(app[REDIS])}))
    app.cleanup_ctx.append(_redis_ctx)
    return app


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    app[REDIS] = aioredis.from_url(app[SETTINGS].redis_url)
    yield
    await app[REDIS].aclose()
