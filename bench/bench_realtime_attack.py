"""The realtime memory attack of issue 13 (finding 8), bounded and on 127.0.0.1 only.

Opens ``--connections`` WebSockets with ``--credentials`` distinct credentials (round robin); each sends one
``subscribe`` for ``--ids`` made-up device ids, then the gateway's RSS and the number of Redis channels are
measured. Uses a private redis-server and a private database (with ``--real`` registered devices, never
subscribed). Run against another version of the service by putting its sources first on PYTHONPATH::

    uv run --frozen python bench/bench_realtime_attack.py --connections 600 --ids 999
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_fanout import raise_fd_limit
from bench.bench_ingest import drop_database, prepare_database
from iot_testkit.measure import rss_mib
from iot_testkit.processes import JWT_SECRET, free_port, private_redis, start_listening
from iot_testkit.tokens import user_token


async def attack(
    session: aiohttp.ClientSession, port: int, connections: int, credentials: int, ids: int
) -> tuple[Counter[str], list[aiohttp.ClientWebSocketResponse]]:
    """Open the connections, subscribe each to made-up ids; the outcomes, and the sockets (left open)."""
    tokens = [user_token(JWT_SECRET, f"attacker-{i}", ttl_s=3600) for i in range(credentials)]
    outcomes: Counter[str] = Counter()
    gate = asyncio.Semaphore(50)
    sockets: list[aiohttp.ClientWebSocketResponse] = []

    async def one(i: int) -> None:
        async with gate:
            url = f"http://127.0.0.1:{port}/ws?token={tokens[i % credentials]}"
            try:
                ws = await session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=10))
            except aiohttp.WSServerHandshakeError as exc:
                outcomes[f"http {exc.status}"] += 1
                return
            sockets.append(ws)
            devices = [f"fake-{i}-{j}" for j in range(ids)]
            await ws.send_json({"type": "subscribe", "id": i, "devices": devices})
            while True:
                message = await asyncio.wait_for(ws.receive(), 60)
                if message.type is aiohttp.WSMsgType.TEXT:
                    frame = message.json()
                    if frame["type"] == "ack":
                        outcomes["subscribed"] += 1
                        return
                    if frame["type"] == "error":
                        outcomes[f"error {frame['code']}"] += 1
                        return
                else:
                    outcomes[f"closed {ws.close_code}"] += 1
                    return

    await asyncio.gather(*(one(i) for i in range(connections)))
    outcomes["open sockets"] = sum(1 for ws in sockets if not ws.closed)
    return outcomes, sockets


async def channels(redis_url: str) -> tuple[int, int]:
    client = aioredis.from_url(redis_url)
    try:
        names = await client.pubsub_channels()
        return len(names), int(await client.pubsub_numpat())
    finally:
        await client.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=600)
    parser.add_argument("--ids", type=int, default=999, help="made-up device ids per subscribe (<= 1000)")
    parser.add_argument("--credentials", type=int, default=1, help="distinct credentials, round robin")
    parser.add_argument("--real", type=int, default=100, help="registered devices in the database")
    args = parser.parse_args()
    raise_fd_limit()
    database_url = asyncio.run(prepare_database([f"real-{i}" for i in range(args.real)]))
    try:
        with private_redis() as redis:
            redis_url = redis.url
            port = free_port()
            env = {
                **os.environ,
                "IOT_REDIS_URL": redis_url,
                "IOT_DATABASE_URL": database_url,
                "IOT_REALTIME_PORT": str(port),
                "IOT_JWT_SECRET": JWT_SECRET,
                "IOT_LOG_LEVEL": "error",
                "IOT_LOG_FORMAT": "json",
            }
            command = [sys.executable, "-c", "from iot_realtime.main import main; main()"]
            service = start_listening(command, port, "iot-realtime", timeout=20, env=env)
            try:
                time.sleep(1.0)  # let start-up allocations settle before the baseline RSS
                before = rss_mib(service.pid)
                started = time.monotonic()

                async def run() -> tuple[Counter[str], tuple[int, int], float]:
                    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                        outcomes, sockets = await attack(
                            session, port, args.connections, args.credentials, args.ids
                        )
                        counted = await channels(redis_url)
                        rss = rss_mib(service.pid)
                        for ws in sockets:
                            with contextlib.suppress(aiohttp.ClientError, OSError):
                                await ws.close()
                    return outcomes, counted, rss

                outcomes, (channel_count, patterns), after = asyncio.run(run())
                elapsed = time.monotonic() - started
            finally:
                service.terminate()
                service.wait(30)
    finally:
        asyncio.run(drop_database(database_url))
    print(
        f"{args.connections} connections x {args.ids} made-up ids, {args.credentials} credential(s), "
        f"{elapsed:.1f}s"
    )
    print(f"  outcomes: {dict(sorted(outcomes.items()))}")
    print(f"  gateway RSS: {before:.0f} MiB before, {after:.0f} MiB with the connections open")
    print(f"  Redis channels: {channel_count} (patterns: {patterns})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
