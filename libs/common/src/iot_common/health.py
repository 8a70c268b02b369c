"""Liveness and readiness helpers shared by the services' ``/healthz`` and ``/readyz`` endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis

Check = Callable[[], Awaitable[object]]


class HealthReport(msgspec.Struct, frozen=True):
    status: str
    checks: dict[str, str]


async def _run_one(check: Check, timeout: float) -> str:
    try:
        await asyncio.wait_for(check(), timeout)
    except TimeoutError:
        return "timeout"
    except Exception as exc:
        return f"error: {type(exc).__name__}: {exc}"[:200]
    return "ok"


async def run_checks(checks: Mapping[str, Check], timeout: float = 2.0) -> HealthReport:
    """Run every check concurrently; the report is ``ok`` only when all of them are."""
    names = list(checks)
    results = await asyncio.gather(*(_run_one(checks[n], timeout) for n in names))
    report = dict(zip(names, results, strict=True))
    ok = all(r == "ok" for r in results)
    return HealthReport(status="ok" if ok else "unavailable", checks=report)


def postgres_check(pool: asyncpg.Pool[Any]) -> Check:
    async def check() -> object:
        return await pool.fetchval("SELECT 1")

    return check


def redis_check(client: aioredis.Redis) -> Check:
    async def check() -> object:
        return await client.ping()

    return check
