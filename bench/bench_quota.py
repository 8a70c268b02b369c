"""Per-device quota: one device floods, another publishes at a modest rate; the calm one's store delay.

Everything on 127.0.0.1: a private Mosquitto, a fresh database, the local Redis, ``iot-ingest`` as a
process. Per scenario (no flood; a flood with the quota off; the same flood with the quota on), a new
ingest process; the flooding device publishes ``--flood`` messages (one reading of 3 metrics each) as
fast as the broker takes them while the calm device publishes ``--calm-rate`` messages/s for
``--calm-seconds``. The calm device's delay is from its publish (the ``sent_ms`` in the payload) to its
event on the device's Redis channel, which ingest publishes right after the commit.

    uv run python bench/bench_quota.py [--flood 100000] [--calm-rate 20] [--quota 1000] [--burst 10000]

Bounded: the flood is a fixed count, every wait has a deadline. Figures are noisy on a shared 2-core box.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_ingest import REDIS, drop_database, prepare_database  # noqa: E402
from iot_common.tenancy import DEFAULT_TENANT_ID  # noqa: E402
from iot_common.topics import RedisNames  # noqa: E402
from iot_testkit.loadgen import PublishResult, publish_async, telemetry_payload  # noqa: E402
from iot_testkit.measure import percentile  # noqa: E402
from iot_testkit.metrics import metric  # noqa: E402
from iot_testkit.processes import ServiceProcess, free_port, mosquitto  # noqa: E402
from iot_testkit.waiting import WaitTimeout, wait_for  # noqa: E402


async def scenario(
    args: argparse.Namespace,
    mqtt_url: str,
    db_url: str,
    flood: str,
    calm: str,
    quota: float,
    name: str,
    flood_messages: int,
) -> dict[str, Any]:
    port = free_port()
    names = RedisNames(f"bench-quota-{uuid.uuid4().hex[:8]}")
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    proc = ServiceProcess(
        "iot-ingest",
        {
            "IOT_DATABASE_URL": db_url,
            "IOT_REDIS_URL": REDIS,
            "IOT_MQTT_URL": mqtt_url,
            "IOT_REDIS_PREFIX": names.prefix,
            "IOT_MQTT_SHARE_GROUP": f"quota-{name}",
            "IOT_MQTT_CLIENT_ID": f"bench-quota-{uuid.uuid4().hex[:8]}",
            "IOT_INGEST_HTTP_PORT": str(port),
            "IOT_LOG_LEVEL": "warning",
            "IOT_INGEST_MAX_READINGS_PER_DEVICE_S": str(quota),
            "IOT_INGEST_MAX_READINGS_PER_DEVICE_BURST": str(args.burst),
        },
        artifacts,
    ).start()
    base = f"http://127.0.0.1:{port}"
    redis = aioredis.from_url(REDIS)
    db = await asyncpg.connect(db_url)
    try:
        await asyncio.to_thread(proc.wait_http, f"{base}/readyz")
        await db.execute("TRUNCATE telemetry, ingest_rejects")
        pubsub = redis.pubsub()
        await pubsub.subscribe(names.device_channel(DEFAULT_TENANT_ID, calm))
        delays: list[float] = []

        async def listen() -> None:
            while True:
                event = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if event is not None:
                    body = json.loads(event["data"])
                    if body["type"] == "telemetry":
                        delays.append(time.time() * 1000 - body["metrics"]["sent_ms"])

        calm_messages = int(args.calm_rate * args.calm_seconds)
        calm_task = asyncio.create_task(
            publish_async(
                mqtt_url,
                [calm],
                calm_messages,
                rate=args.calm_rate,
                payload=lambda seq, _: b'{"sent_ms": %d}' % (time.time() * 1000),
                timeout_s=60,
            )
        )
        listener = asyncio.create_task(listen())
        started = time.monotonic()
        base_ms = int(time.time() * 1000) - flood_messages - 60_000
        if args.verbose:
            print(f"  {name}: flooding", flush=True)
        result = PublishResult(0, 0, 0.0, time.time())
        if flood_messages:
            result = await publish_async(
                mqtt_url, [flood], flood_messages, base_ms=base_ms, payload=telemetry_payload, timeout_s=120
            )

        async def all_handled() -> bool:
            handled = await db.fetchval(
                "SELECT (SELECT count(DISTINCT ts) FROM telemetry WHERE device_id = $1)"
                " + (SELECT count(*) FROM ingest_rejects WHERE device_id = $1)",
                flood,
            )
            if args.verbose:
                print(f"  {name}: {handled}/{result.acked} handled, calm delays {len(delays)}", flush=True)
            return bool(handled >= result.acked)

        # Bounded waits: what is not handled or received in time shows in the figures.
        with contextlib.suppress(WaitTimeout):
            await wait_for(all_handled, 180, "the flood handled", interval=2.0 if args.verbose else 0.2)
        handled_s = time.monotonic() - started
        calm_sent = (await calm_task).acked
        with contextlib.suppress(WaitTimeout):
            await wait_for(lambda: len(delays) >= calm_sent, 30, "the calm device's readings")
        listener.cancel()
        await pubsub.aclose()
        stored = await db.fetchval("SELECT count(DISTINCT ts) FROM telemetry WHERE device_id = $1", flood)
        limited = await db.fetchval(
            "SELECT count(*) FROM ingest_rejects WHERE device_id = $1 AND reason = 'rate_limited'", flood
        )
        ordered = sorted(delays)
        return {
            "scenario": name,
            "quota_readings_per_s": quota,
            "burst": args.burst,
            "flood_published": result.acked,
            "flood_publish_s": round(result.elapsed_s, 2),
            "flood_stored": stored,
            "flood_rate_limited": limited,
            "flood_handled_s": round(handled_s, 2),
            "calm_sent": calm_sent,
            "calm_received": len(delays),
            "calm_delay_ms_p50": round(statistics.median(ordered), 1) if ordered else None,
            "calm_delay_ms_p95": round(percentile(ordered, 0.95), 1) if ordered else None,
            "calm_delay_ms_max": round(ordered[-1], 1) if ordered else None,
            "stored_total_metric": metric(base, "iot_ingest_readings_stored_total"),
        }
    finally:
        await db.close()
        await redis.aclose()
        proc.stop()


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    prefix = f"quota{uuid.uuid4().hex[:6]}"
    flood, calm = f"{prefix}-flood", f"{prefix}-calm"
    db_url = await prepare_database([flood, calm])
    results = []
    try:
        with mosquitto() as mqtt_url:
            scenarios = (
                ("no-flood", 0.0, 0),
                ("quota-off", 0.0, args.flood),
                ("quota-on", args.quota, args.flood),
            )
            for name, quota, flood_messages in scenarios:
                if args.only and name != args.only:
                    continue
                outcome = await scenario(args, mqtt_url, db_url, flood, calm, quota, name, flood_messages)
                print(json.dumps(outcome), flush=True)
                results.append(outcome)
    finally:
        await drop_database(db_url)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description="per-device ingest quota benchmark")
    parser.add_argument("--flood", type=int, default=100_000, help="messages the flooding device sends")
    parser.add_argument("--calm-rate", type=float, default=20.0, help="messages/s of the calm device")
    parser.add_argument("--calm-seconds", type=float, default=20.0, help="how long the calm device publishes")
    parser.add_argument("--quota", type=float, default=1000.0, help="readings/s per device when on")
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--only", choices=["no-flood", "quota-off", "quota-on"], help="run one scenario")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    (ROOT / "artifacts" / "bench_quota.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
