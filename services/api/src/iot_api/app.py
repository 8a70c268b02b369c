"""Wiring of the API service: ``create_app(settings)`` builds the Litestar application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from litestar import Litestar, Response, get
from litestar.datastructures import State

from iot_api.settings import ApiSettings
from iot_common.db import create_pool
from iot_common.health import HealthReport, postgres_check, redis_check, run_checks
from iot_common.metrics import render_metrics


@get("/healthz", operation_id="healthz", tags=["operations"])
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@get("/readyz", operation_id="readyz", tags=["operations"])
async def readyz(state: State) -> Response[HealthReport]:
    """Readiness: PostgreSQL and Redis answer."""
    report = await run_checks({"postgres": postgres_check(state.pool), "redis": redis_check(state.redis)})
    return Response(report, status_code=200 if report.status == "ok" else 503)


@get("/metrics", operation_id="metrics", tags=["operations"], include_in_schema=False)
async def metrics() -> Response[bytes]:
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)


def create_app(settings: ApiSettings) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        pool: asyncpg.Pool[Any] = await create_pool(
            settings.database_url,
            min_size=settings.database_pool_min,
            max_size=settings.database_pool_max,
        )
        redis = aioredis.from_url(settings.redis_url)
        app.state.pool = pool
        app.state.redis = redis
        try:
            yield
        finally:
            await redis.aclose()
            await pool.close()

    return Litestar(
        route_handlers=[healthz, readyz, metrics],
        lifespan=[lifespan],
        state=State({"settings": settings}),
        logging_config=None,
    )
