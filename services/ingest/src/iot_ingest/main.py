"""``iot-ingest``: runs the ingest service until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis
from aiohttp import web

from iot_common.db import create_pool
from iot_common.db.partitions import run_maintenance_forever
from iot_common.health import postgres_check, redis_check
from iot_common.service import run_service
from iot_common.web import health_routes
from iot_ingest.settings import IngestSettings


async def serve(settings: IngestSettings, stop: asyncio.Event) -> None:
    """Run the ingest service until ``stop`` is set."""
    pool = await create_pool(
        settings.database_url,
        min_size=settings.database_pool_min,
        max_size=settings.database_pool_max,
    )
    redis = aioredis.from_url(settings.redis_url)
    app = web.Application()
    app.add_routes(health_routes(lambda: {"postgres": postgres_check(pool), "redis": redis_check(redis)}))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", settings.ingest_http_port).start()
    maintenance = asyncio.create_task(
        run_maintenance_forever(
            pool,
            retention_days=settings.telemetry_retention_days,
            ahead_days=settings.telemetry_partitions_ahead_days,
        )
    )
    try:
        await stop.wait()
    finally:
        maintenance.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await maintenance
        await runner.cleanup()
        await redis.aclose()
        await pool.close()


def main() -> None:
    run_service("iot-ingest", IngestSettings, serve)
