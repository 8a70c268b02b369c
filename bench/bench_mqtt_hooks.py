"""EMQX hook benchmark: requests/s and p50/p95 latency of ``/api/v1/mqtt/authn`` and ``/authz``.

A fresh database (``iot_bench_hooks``, recreated each run) with 500 devices created through the API (so
each has MQTT credentials), a private redis-server on a free port, ``iot-api`` as a process, and the load
from a separate process (aiohttp, N concurrent connections), all on 127.0.0.1. Each request names a random
device: after the first request per device the answer comes from the Redis cache. The machine is small
and shared: figures are noisy, compare medians of several runs.

Run: ``make bench`` or ``uv run python bench/bench_mqtt_hooks.py [--duration 6] [--concurrency 32]``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support import LoadResult, api_process, in_process, migrated_database
from iot_testkit.measure import percentile
from iot_testkit.processes import private_redis

DATABASE = "iot_bench_hooks"
DEVICES = 500
API_KEY = "iotk_benchhooks01_" + "h" * 24
HOOK_SECRET = "bench-hook-secret-0123456789abcdef"


async def _load(
    base: str, path: str, bodies: list[dict[str, Any]], concurrency: int, duration: float
) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"X-Hook-Secret": HOOK_SECRET}
    async with aiohttp.ClientSession(base, connector=connector, headers=headers) as http:

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                body = random.choice(bodies)
                began = time.perf_counter()
                async with http.post(path, json=body) as response:
                    answer = await response.json()
                    if response.status != 200 or answer["result"] != "allow":
                        errors += 1
                latencies.append((time.perf_counter() - began) * 1000)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return LoadResult(len(latencies), errors, elapsed, latencies)


def load(base: str, path: str, bodies: list[dict[str, Any]], concurrency: int, duration: float) -> LoadResult:
    return in_process(_load, base, path, bodies, concurrency, duration)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per scenario")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    database_url = asyncio.run(migrated_database(DATABASE, fresh=True))
    env = {
        "IOT_DATABASE_URL": database_url,
        "IOT_BOOTSTRAP_API_KEY": API_KEY,
        "IOT_API_RATE_LIMIT_PER_MINUTE": "100000000",
        "IOT_API_CACHE_TTL_S": "300",
        "IOT_MQTT_HOOK_SECRET": HOOK_SECRET,
    }
    with private_redis() as redis, api_process({**env, "IOT_REDIS_URL": redis.url}) as api:
        base = api.base
        authn, authz = [], []
        with httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=10) as http:
            for i in range(DEVICES):
                device_id = f"hook-{i:04d}"
                mqtt = http.post("/api/v1/devices", json={"id": device_id}).json()["mqtt"]
                authn.append({"username": device_id, "password": mqtt["password"], "clientid": device_id})
                topic = f"devices/telemetry/{device_id}"
                authz.append(
                    {"username": device_id, "clientid": device_id, "action": "publish", "topic": topic}
                )
        rows = []
        for name, path, bodies in (
            ("authn", "/api/v1/mqtt/authn", authn),
            ("authz", "/api/v1/mqtt/authz", authz),
        ):
            load(base, path, bodies, args.concurrency, 2.0)  # warm the cache and the connections
            result = load(base, path, bodies, args.concurrency, args.duration)
            rows.append(
                (
                    name,
                    result.requests / result.seconds,
                    statistics.median(result.latencies_ms),
                    percentile(result.latencies_ms, 0.95),
                    result.errors,
                )
            )
    print(f"\nEMQX hooks, {DEVICES} devices, concurrency {args.concurrency}, {args.duration:.0f} s per row")
    print(f"{'hook':<8}{'req/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'errors':>8}")
    for name, rate, p50, p95, errors in rows:
        print(f"{name:<8}{rate:>10.0f}{p50:>10.2f}{p95:>10.2f}{errors:>8}")


if __name__ == "__main__":
    main()
