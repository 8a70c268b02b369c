"""HTTP device ingest benchmark: readings/s over HTTP at 1 and at 1,000 readings per request, beside MQTT in
the same run, each counted from the database.

Everything on 127.0.0.1: a private Mosquitto, a fresh database on the local PostgreSQL, the local Redis,
one ``iot-ingest`` process. Devices are registered with a credential (its SHA-256, as the API stores it).

- http x1: ``POST /ingest/v1/devices/{id}/telemetry`` with one reading (3 metrics), ``--concurrency``
  requests at once over keep-alive connections (aiohttp, in this process), HTTP Basic;
- http x1000: the same with arrays of 1,000 readings (a backfill), ``--batch-concurrency`` at once;
- mqtt: the QoS 1 publisher of bench_ingest (iot_testkit.loadgen, another process), one reading a message.

A rate is readings found in the database for the run (rows / 3) over the time from the first request to
the last answer (HTTP answers after the commit) or to the moment the database holds every reading (MQTT,
polled every 0.1 s). The per-device quota is off (``IOT_INGEST_MAX_READINGS_PER_DEVICE_S=0``): this
measures the pipeline, not the limit.

    uv run python bench/bench_http_ingest.py [--devices 50] [--requests 5000] [--batches 100]
        [--messages 50000] [--concurrency 32] [--batch-concurrency 8] [--runs 2]

The machine has 2 cores shared by the client, the broker, PostgreSQL and the service: figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_ingest import REDIS, cpu_seconds, drop_database, prepare_database, publisher
from iot_ingest.device_auth import hash_secret
from iot_testkit.processes import ServiceProcess, free_port, mosquitto
from iot_testkit.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
METRICS = 3


def reading(ts_ms: int, seq: int) -> dict[str, float | int]:
    return {"ts": ts_ms, "temperature": 20 + (seq % 100) / 10, "humidity": 30 + seq % 50, "seq": seq}


async def stored_readings(db_url: str, base_ms: int, count: int) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetchval(
            "SELECT count(*) FROM telemetry WHERE ts >= to_timestamp($1 / 1000.0)"
            " AND ts < to_timestamp(($1 + $2) / 1000.0)",
            base_ms,
            count,
        )
    finally:
        await conn.close()
    return int(rows) // METRICS


async def http_run(
    base: str,
    auth: list[str],
    devices: list[str],
    per_request: int,
    requests: int,
    concurrency: int,
    base_ms: int,
) -> tuple[float, dict[int, int]]:
    """Post ``requests`` requests of ``per_request`` readings; (seconds to the last answer, statuses)."""
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    bodies = []
    # Bodies built before the clock starts: the client's JSON encoding is not the service's cost.
    for i in range(requests):
        first = i * per_request
        items = [reading(base_ms + first + k, first + k) for k in range(per_request)]
        bodies.append(json.dumps(items[0] if per_request == 1 else items).encode())
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                n = i % len(devices)
                async with session.post(
                    f"{base}/ingest/v1/devices/{devices[n]}/telemetry",
                    data=bodies[i],
                    headers={"Authorization": auth[n], "Content-Type": "application/json"},
                ) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, statuses


async def mqtt_run(
    mqtt_url: str, prefix: str, db_url: str, devices: int, messages: int, base_ms: int
) -> float:
    pub = publisher(mqtt_url, prefix, devices, messages, base_ms)

    async def all_stored() -> bool:
        return await stored_readings(db_url, base_ms, messages) >= messages

    await wait_for(all_stored, 300, "every MQTT reading in the database", interval=0.1)
    done = time.time()
    published = json.loads(pub.communicate(timeout=300)[0])
    assert published["acked"] == messages, published
    return messages / (done - published["started_at"])


async def add_credentials(db_url: str, devices: list[str]) -> list[str]:
    """A secret per device, stored as the API does; the Basic headers."""
    secrets = {d: f"iotd_bench_{uuid.uuid4().hex}" for d in devices}
    conn = await asyncpg.connect(db_url)
    try:
        await conn.executemany(
            "INSERT INTO device_credentials (device_id, secret_hash) VALUES ($1, $2)",
            [(d, hash_secret(s)) for d, s in secrets.items()],
        )
    finally:
        await conn.close()
    return ["Basic " + base64.b64encode(f"{d}:{secrets[d]}".encode()).decode() for d in devices]


async def bench(
    args: argparse.Namespace, db_url: str, devices: list[str], prefix: str
) -> list[dict[str, float]]:
    auth = await add_credentials(db_url, devices)
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    rows = []
    with mosquitto() as mqtt_url:
        port = free_port()
        proc = ServiceProcess(
            "iot-ingest",
            {
                "IOT_DATABASE_URL": db_url,
                "IOT_REDIS_URL": REDIS,
                "IOT_MQTT_URL": mqtt_url,
                "IOT_MQTT_SHARE_GROUP": f"bench-{prefix}",
                "IOT_MQTT_CLIENT_ID": f"bench-{prefix}",
                "IOT_INGEST_HTTP_PORT": str(port),
                "IOT_INGEST_MAX_READINGS_PER_DEVICE_S": "0",
                "IOT_LOG_LEVEL": "warning",
            },
            artifacts,
        ).start()
        base = f"http://127.0.0.1:{port}"
        try:
            await asyncio.to_thread(proc.wait_http, f"{base}/readyz")
            pid = proc.proc.pid if proc.proc else None
            one, many = args.requests, args.batches * 1000
            span = one + many + args.messages + 10_000
            start_ms = int(time.time() * 1000) - (args.runs + 2) * span
            for run in range(args.runs):
                base_ms = start_ms + run * span
                row: dict[str, float] = {}
                for name, per, count, conc, at in (
                    ("http_1", 1, args.requests, args.concurrency, base_ms),
                    ("http_1000", 1000, args.batches, args.batch_concurrency, base_ms + one),
                ):
                    cpu = cpu_seconds(pid)
                    elapsed, statuses = await http_run(base, auth, devices, per, count, conc, at)
                    row[f"{name}_cpu"] = (cpu_seconds(pid) - cpu) / (per * count) * 1e6
                    stored = await stored_readings(db_url, at, per * count)
                    assert statuses == {200: count}, statuses
                    assert stored == per * count, (stored, per * count)
                    row[name] = stored / elapsed
                cpu = cpu_seconds(pid)
                row["mqtt"] = await mqtt_run(
                    mqtt_url, prefix, db_url, len(devices), args.messages, base_ms + one + many
                )
                row["mqtt_cpu"] = (cpu_seconds(pid) - cpu) / args.messages * 1e6
                rows.append(row)
                print(
                    f"run {run + 1}: http x1 {row['http_1']:,.0f} readings/s, "
                    f"http x1000 {row['http_1000']:,.0f} readings/s, mqtt {row['mqtt']:,.0f} readings/s",
                    flush=True,
                )
        finally:
            proc.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description="HTTP ingest benchmark, beside MQTT")
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--requests", type=int, default=5000, help="requests of one reading per run")
    parser.add_argument("--batches", type=int, default=100, help="requests of 1,000 readings per run")
    parser.add_argument("--messages", type=int, default=50_000, help="MQTT messages per run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch-concurrency", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    devices = [f"{prefix}-{i:05d}" for i in range(args.devices)]
    db_url = asyncio.run(prepare_database(devices))
    try:
        rows = asyncio.run(bench(args, db_url, devices, prefix))
    finally:
        asyncio.run(drop_database(db_url))
    print()
    print(
        f"HTTP ingest benchmark: {args.devices} devices, 3 metrics a reading, {args.runs} runs; "
        f"http x1: {args.requests:,} requests at concurrency {args.concurrency}; "
        f"http x1000: {args.batches} requests at concurrency {args.batch_concurrency}; "
        f"mqtt: {args.messages:,} QoS 1 messages"
    )
    print("readings/s (ingest CPU us/reading)")
    print(f"{'run':>4} {'http x1':>20} {'http x1000':>20} {'mqtt':>20}")
    keys = ("http_1", "http_1000", "mqtt")

    def cell(values: dict[str, float], key: str) -> str:
        return f"{values[key]:,.0f} ({values[key + '_cpu']:.0f} us)"

    for i, row in enumerate(rows, 1):
        print(f"{i:>4} " + " ".join(f"{cell(row, k):>20}" for k in keys))
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"{'med':>4} " + " ".join(f"{cell(med, k):>20}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
