"""Readiness: which backing stores answer, and whether the API can serve without the others."""

from __future__ import annotations

from typing import Any

import asyncpg
import redis.asyncio as aioredis

from iot_api.mqtt import CommandPublisher
from iot_common.health import HealthReport, postgres_check, redis_check, run_checks


class HealthService:
    def __init__(self, pool: asyncpg.Pool[Any], redis: aioredis.Redis, mqtt: CommandPublisher) -> None:
        self.pool = pool
        self.redis = redis
        self.mqtt = mqtt

    async def readiness(self) -> tuple[HealthReport, bool]:
        """Every check's outcome, and whether the API is ready: only PostgreSQL is required (without
        Redis it reads the database, without MQTT only sending commands fails)."""
        report = await run_checks(
            {
                "postgres": postgres_check(self.pool),
                "redis": redis_check(self.redis),
                "mqtt": self.mqtt.check,
            }
        )
        return report, report.checks.get("postgres") == "ok"
