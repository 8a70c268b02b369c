"""Ingest benchmark: sustained messages/s from publish to committed rows, beside the raw broker rate.

Everything runs on 127.0.0.1: a private Mosquitto (no queue limit), a fresh database on the local
PostgreSQL, the local Redis, ``iot-ingest`` as a process, and the publisher (iot_testkit.loadgen) as another
process: QoS 1, K devices, 3 metrics per message, counting PUBACKs.

- raw: the same publisher into a bare subscriber (acknowledges at once, does nothing): what the broker
  and the publisher can do on this machine, measured in the same run;
- ingest: from the first publish to the moment the run's messages are all in the database (counted there,
  polled every 50 ms, not taken from the service's own counter).

    uv run python bench/bench_ingest.py [--messages 100000] [--devices 100] [--runs 3] [--rules 0]
        [--tenant-limit N] [--recent] [--profile]

Readings are stamped minutes in the past by default, so every one is late for the rollups (ingest marks
its minute in ``telemetry_rollup_dirty``: the most that costs); ``--recent`` stamps them from now on, the
usual case, where nothing is marked.

``--profile`` runs the ingest process under py-spy (artifacts/bench_ingest.svg; ``PYSPY_FORMAT=raw`` for
collapsed stacks in artifacts/bench_ingest.txt).
The machine has 2 cores shared by the publisher, the broker, PostgreSQL and the service: figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_testkit import backends
from iot_testkit.backends import configured_url, with_database
from iot_testkit.metrics import metric
from iot_testkit.processes import BIN, ServiceProcess, free_port, mosquitto

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ("-m", "iot_testkit.loadgen")
POSTGRES = configured_url(backends.POSTGRES)
REDIS = configured_url(backends.REDIS)


def publisher(url: str, prefix: str, devices: int, messages: int, base_ms: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *(sys.executable, *LOADGEN, "publish", "--url", url, "--prefix", prefix),
            *("--devices", str(devices), "--messages", str(messages), "--base-ms", str(base_ms)),
            *("--max-inflight", "2000"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def raw_run(url: str, prefix: str, devices: int, messages: int) -> float:
    sub = subprocess.Popen(
        [
            *(sys.executable, *LOADGEN, "subscribe", "--url", url),
            *("--topic", "devices/telemetry/+", "--count", str(messages)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sub.stdout is not None
    sub.stdout.readline()  # {"ready": true}
    pub = publisher(url, prefix, devices, messages, int(time.time() * 1000))
    published = json.loads(pub.communicate(timeout=300)[0])
    received = json.loads(sub.communicate(timeout=300)[0])
    assert published["acked"] == messages, published
    assert received["received"] == messages, received
    return messages / (received["last_at"] - published["started_at"])


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (0 when it cannot be read, e.g. under py-spy)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_stored(db_url: str, devices: list[str], base_ms: int, messages: int, timeout: float) -> float:
    """Poll the database until the ``messages`` of a run are stored; the time then.

    Counts the run's ``seq`` rows (``ts`` from ``base_ms`` to ``base_ms + messages`` ms: not the raw
    baseline's, which the service stores too) through the primary key (device, metric, ts), so polling
    stays cheap.
    """
    conn = await asyncpg.connect(db_url)
    since = datetime.fromtimestamp(base_ms / 1000, UTC)
    until = datetime.fromtimestamp((base_ms + messages) / 1000, UTC)
    deadline = time.monotonic() + timeout
    try:
        while True:
            stored = await conn.fetchval(
                "SELECT count(*) FROM telemetry "
                "WHERE device_id = ANY($1) AND metric = 'seq' AND ts >= $2 AND ts < $3",
                devices,
                since,
                until,
            )
            if stored >= messages:
                return time.time()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{stored} of {messages} messages stored after {timeout} s")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


def ingest_run(
    url: str,
    base: str,
    db_url: str,
    prefix: str,
    devices: int,
    messages: int,
    base_ms: int,
    pid: int | None,
) -> dict[str, float]:
    batches = metric(base, "iot_ingest_batch_size_count")
    cpu = cpu_seconds(pid)
    pub = publisher(url, prefix, devices, messages, base_ms)
    ids = [f"{prefix}-{i:05d}" for i in range(devices)]
    done = asyncio.run(wait_stored(db_url, ids, base_ms, messages, 300))
    cpu = cpu_seconds(pid) - cpu
    published = json.loads(pub.communicate(timeout=300)[0])
    assert published["acked"] == messages, published
    batch_count = metric(base, "iot_ingest_batch_size_count") - batches
    return {
        "rate": messages / (done - published["started_at"]),
        "publish_rate": published["rate"],
        "mean_batch": messages / batch_count if batch_count else 0.0,
        "cpu_us": cpu / messages * 1e6,
    }


async def prepare_database(
    devices: list[str], rules: int = 0, tenant_limit: int | None = None, server: str = POSTGRES
) -> str:
    """A new database on ``server``, migrated, with ``devices`` registered; its URL."""
    name = f"iot_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = with_database(server, name)
    env = {**os.environ, "IOT_DATABASE_URL": url, "IOT_LOG_FORMAT": "json"}
    migrate = await asyncio.create_subprocess_exec(str(BIN / "iot-migrate"), env=env, stderr=subprocess.PIPE)
    if await migrate.wait() != 0:
        raise RuntimeError("iot-migrate failed")
    conn = await asyncpg.connect(url)
    await conn.execute("INSERT INTO devices (id, type) SELECT unnest($1::text[]), 'bench'", devices)
    # Alert rules on the devices' type that never fire: the cost of evaluating every reading.
    await conn.execute(
        "INSERT INTO alert_rules (tenant_id, name, device_type, metric, op, threshold) "
        "SELECT $2, 'bench ' || i, 'bench', 'temperature', '>', 1e9 + i FROM generate_series(1, $1) AS i",
        rules,
        DEFAULT_TENANT_ID,
    )
    # A readings limit on the devices' tenant, above what the run sends: the cost of counting in Redis.
    await conn.execute(
        "UPDATE tenants SET max_readings_per_s = $1 WHERE id = $2", tenant_limit, DEFAULT_TENANT_ID
    )
    await conn.close()
    return url


async def drop_database(url: str, server: str = POSTGRES) -> None:
    admin = await asyncpg.connect(server)
    await admin.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path[1:]}" WITH (FORCE)')
    await admin.close()


def main() -> int:
    parser = argparse.ArgumentParser(description="ingest benchmark")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="py-spy one extra run of the ingest process")
    parser.add_argument(
        "--recent", action="store_true", help="stamp readings from now on (none late for the rollups)"
    )
    parser.add_argument("--rules", type=int, default=0, help="alert rules every reading is evaluated against")
    parser.add_argument(
        "--tenant-limit",
        type=int,
        default=None,
        help="max_readings_per_s of the devices' tenant (counted in Redis per batch); default: no limit",
    )
    args = parser.parse_args()
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    devices = [f"{prefix}-{i:05d}" for i in range(args.devices)]
    db_url = asyncio.run(prepare_database(devices, args.rules, args.tenant_limit))
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    fmt = os.environ.get("PYSPY_FORMAT", "flamegraph")
    rows: list[tuple[int, float, float, float, float, float]] = []
    try:
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
                    "IOT_LOG_LEVEL": "warning",
                },
                artifacts,
            )
            if args.profile:
                # py-spy starts the service and samples it for the whole benchmark (attaching to a running
                # process is not permitted in every container).
                out = artifacts / ("bench_ingest.txt" if fmt == "raw" else "bench_ingest.svg")
                spy = [str(BIN / "py-spy"), "record", "-o", str(out), "-f", fmt, "-r", "100", "--"]
                proc.proc = subprocess.Popen(
                    [*spy, str(BIN / "iot-ingest")],
                    env=proc.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            else:
                proc.start()
            base = f"http://127.0.0.1:{port}"
            try:
                proc.wait_http(f"{base}/readyz")
                span = args.messages + 10_000
                start_ms = int(time.time() * 1000) - (0 if args.recent else (args.runs + 2) * span)
                for run in range(args.runs):
                    raw = raw_run(mqtt_url, prefix, args.devices, args.messages)
                    pid = None if args.profile else proc.proc.pid if proc.proc else None
                    res = ingest_run(
                        mqtt_url,
                        base,
                        db_url,
                        prefix,
                        args.devices,
                        args.messages,
                        start_ms + run * span,
                        pid,
                    )
                    rows.append(
                        (run + 1, raw, res["rate"], res["rate"] / raw, res["mean_batch"], res["cpu_us"])
                    )
                    print(
                        f"run {run + 1}: raw {raw:,.0f} msg/s, ingest {res['rate']:,.0f} msg/s, "
                        f"mean batch {res['mean_batch']:.0f}, ingest CPU {res['cpu_us']:.1f} us/message",
                        flush=True,
                    )
            finally:
                if args.profile:
                    # SIGTERM the sampled service (py-spy's child); py-spy then writes its output and exits.
                    assert proc.proc is not None
                    children = (
                        Path(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children").read_text().split()
                    )
                    for child in children:
                        os.kill(int(child), 15)
                    proc.proc.wait(60)
                    print(f"py-spy profile of iot-ingest: {out}")
                else:
                    proc.stop()
    finally:
        asyncio.run(drop_database(db_url))

    print()
    print(
        f"ingest benchmark: {args.messages:,} messages x {args.runs} runs, {args.devices} devices, "
        f"3 metrics, {args.rules} alert rules, tenant limit {args.tenant_limit or 'none'}, "
        f"readings {'recent' if args.recent else 'late for the rollups'}"
    )
    header = f"{'run':>4} {'raw broker msg/s':>17} {'ingest msg/s':>13} {'ratio':>6} {'mean batch':>11}"
    print(header + f" {'ingest CPU us/msg':>18}")
    for run, raw, rate, ratio, batch, cpu_us in rows:
        print(f"{run:>4} {raw:>17,.0f} {rate:>13,.0f} {ratio:>6.2f} {batch:>11.0f} {cpu_us:>18.1f}")
    med = [statistics.median(col) for col in list(zip(*rows, strict=True))[1:]]
    print(f"{'med':>4} {med[0]:>17,.0f} {med[1]:>13,.0f} {med[2]:>6.2f} {med[3]:>11.0f} {med[4]:>18.1f}")
    print("target: 25,000 msg/s sustained (2 shared cores: publisher, broker, PostgreSQL and ingest)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
