"""Login flood: the API's memory and a cheap request's latency while bad logins pour in.

Starts ``iot-api`` as a process on a fresh database (``iot_bench_login``) and a private redis-server, both
on 127.0.0.1. Then, for ``--duration`` seconds, ``--concurrency`` clients each send wrong-password logins
one after another (for ``--accounts`` different e-mail addresses), while one client calls
``GET /api/v1/auth/me`` with an API key every 50 ms. Prints the API's RSS before, its peak RSS during the
flood (``VmHWM``), the latency of the cheap request (p50, p95, max) and the login answers by status.

``--no-login-limits`` turns the per-account and per-address login limits off, to see the bounded password
executor alone; extra ``--env NAME=VALUE`` settings go to the API process.

Run: ``uv run python bench/bench_login.py [--duration 10] [--concurrency 32] [--no-login-limits]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support import api_process, migrated_database
from iot_testkit.measure import percentile, rss_mib
from iot_testkit.processes import private_redis

DATABASE = "iot_bench_login"
API_KEY = "iotk_benchloginbe_" + "b" * 24
ADMIN = "admin@bench.example"


async def flood(base: str, args: argparse.Namespace) -> tuple[collections.Counter[int], list[float]]:
    statuses: collections.Counter[int] = collections.Counter()
    latencies: list[float] = []
    deadline = time.monotonic() + args.duration
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def attacker(n: int) -> None:
            i = 0
            while time.monotonic() < deadline:
                email = ADMIN if args.accounts <= 1 else f"user{(n + i) % args.accounts}@bench.example"
                i += 1
                response = await client.post("/api/v1/auth/login", json={"email": email, "password": "wrong"})
                statuses[response.status_code] += 1
                if response.status_code in (429, 503):
                    await asyncio.sleep(0.05)  # a polite attacker still comes back at once

        async def probe() -> None:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                response = await client.get("/api/v1/auth/me", headers={"X-API-Key": API_KEY})
                latencies.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
                await asyncio.sleep(0.05)

        await asyncio.gather(probe(), *(attacker(n) for n in range(args.concurrency)))
    return statuses, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of flood (at most 60)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent bad logins (at most 256)")
    parser.add_argument("--accounts", type=int, default=1, help="distinct e-mail addresses tried")
    parser.add_argument("--no-login-limits", action="store_true", help="turn the login limits off")
    parser.add_argument("--env", action="append", default=[], help="extra NAME=VALUE for the API")
    args = parser.parse_args()
    args.duration = min(args.duration, 60.0)
    args.concurrency = min(args.concurrency, 256)

    database = asyncio.run(migrated_database(DATABASE, fresh=True))
    env = {
        "IOT_DATABASE_URL": database,
        "IOT_JWT_SECRET": "bench-login-" + "s" * 40,
        "IOT_BOOTSTRAP_API_KEY": API_KEY,
        "IOT_BOOTSTRAP_ADMIN_EMAIL": ADMIN,
        "IOT_BOOTSTRAP_ADMIN_PASSWORD": "bench-admin-password",
        "IOT_API_RATE_LIMIT_PER_MINUTE": "100000000",
    }
    if args.no_login_limits:
        env["IOT_API_LOGIN_FAILURES_PER_ACCOUNT"] = "0"
        env["IOT_API_LOGIN_FAILURES_PER_ADDRESS"] = "0"
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    with private_redis() as redis, api_process({**env, "IOT_REDIS_URL": redis.url}) as api:
        base = api.base
        # Warm up: one request of each kind, then the baseline.
        httpx.get(f"{base}/api/v1/auth/me", headers={"X-API-Key": API_KEY}, timeout=10)
        httpx.post(f"{base}/api/v1/auth/login", json={"email": ADMIN, "password": "x"}, timeout=10)
        quiet = []
        with httpx.Client(base_url=base, timeout=10) as probe:
            for _ in range(20):
                started = time.perf_counter()
                probe.get("/api/v1/auth/me", headers={"X-API-Key": API_KEY})
                quiet.append(time.perf_counter() - started)
        before = rss_mib(api.pid)
        statuses, latencies = asyncio.run(flood(base, args))
        peak = rss_mib(api.pid, "VmHWM")
        after = rss_mib(api.pid)
        latencies.sort()
        print(f"flood: {args.concurrency} concurrent bad logins for {args.duration:.0f} s")
        print(f"RSS before {before:.0f} MiB, peak {peak:.0f} MiB, after {after:.0f} MiB")
        print(f"GET /api/v1/auth/me alone: p50 {statistics.median(quiet) * 1000:.1f} ms")
        print(
            f"GET /api/v1/auth/me during the flood ({len(latencies)} requests):"
            f" p50 {statistics.median(latencies) * 1000:.1f} ms,"
            f" p95 {percentile(latencies, 0.95) * 1000:.1f} ms,"
            f" max {latencies[-1] * 1000:.1f} ms"
        )
        print("login answers:", dict(sorted(statuses.items())))


if __name__ == "__main__":
    main()
