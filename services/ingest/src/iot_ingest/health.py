"""Ingest's HTTP endpoints: ``/healthz``, ``/readyz`` and ``/metrics`` (:func:`iot_common.web.health_routes`),
and on the same port HTTP device ingest (``/ingest/``, :mod:`iot_ingest.http_ingest`).

Ready means: connected to the broker with every subscription granted, no message unacknowledged for
longer than ``IOT_INGEST_STUCK_AFTER_S``, and PostgreSQL and Redis answering.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.typedefs import Middleware

from iot_common.health import Check, postgres_check, redis_check
from iot_common.web import health_routes
from iot_ingest.consumer import Consumer


def checks(
    consumer: Consumer, pool: asyncpg.Pool[Any], redis: aioredis.Redis, *, stuck_after_s: float
) -> dict[str, Check]:
    """The readiness checks, by name."""

    async def mqtt_check() -> object:
        if not consumer.connected.is_set():
            raise ConnectionError("not connected to the MQTT broker")
        consumer.check_subscriptions()
        return True

    async def stuck_check() -> object:
        stuck = consumer.stuck(stuck_after_s)
        if stuck:
            raise RuntimeError(f"{stuck} messages unacknowledged for more than {stuck_after_s:g} s")
        return True

    return {
        "mqtt": mqtt_check,
        "in_flight": stuck_check,
        "postgres": postgres_check(pool),
        "redis": redis_check(redis),
    }


def create_app(
    ready_checks: dict[str, Check],
    alive: Callable[[], bool],
    routes: Sequence[web.RouteDef] = (),
    middlewares: Sequence[Middleware] = (),
) -> web.Application:
    """The aiohttp application; ``/healthz`` fails once ``alive()`` is false (the service is stopping).

    ``routes``: more routes on the same port (HTTP device ingest, :mod:`iot_ingest.http_ingest`)."""
    app = web.Application(middlewares=middlewares)
    app.add_routes(health_routes(lambda: ready_checks, alive=alive))
    app.add_routes(routes)
    return app
