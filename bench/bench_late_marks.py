"""What marking late readings for the rollups costs PostgreSQL: ingest's telemetry statement for a batch,
with and without the mark of its late minutes, alternating in the same run.

A fresh database (migrated by ``iot-migrate``), batches of ``--messages`` readings of 3 metrics over
``--devices`` devices, each batch new rows: ``plain`` is ``INSERT_TELEMETRY`` (readings of now, the usual
case: nothing marked), ``marking`` is ``INSERT_TELEMETRY_MARKING_LATE`` (every reading 10 minutes old: the
most a batch can mark, one minute per device and metric, each mark already there from the batch before,
so updated). Prints the median milliseconds per batch of each.

    uv run python bench/bench_late_marks.py [--batches 40] [--messages 2000] [--devices 100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from iot_common.db import connect
from iot_common.db.partitions import maintain_partitions
from iot_common.db.rollups import LATE_AFTER
from iot_common.messages import Reading
from iot_ingest.telemetry import INSERT_TELEMETRY, INSERT_TELEMETRY_MARKING_LATE, telemetry_columns

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support import migrated_database, server_url


async def main(batches: int, messages: int, devices: int) -> None:
    conn = await connect(await migrated_database("iot_bench_late_marks", fresh=True))
    try:
        await maintain_partitions(conn, retention_days=2, ahead_days=2)
        now = datetime.now(UTC)
        timings: dict[str, list[float]] = {"plain": [], "marking": []}
        for i in range(batches * 2):
            kind = "marking" if i % 2 else "plain"
            base = now - timedelta(minutes=10) if kind == "marking" else now
            readings = [
                Reading(
                    f"d{j % devices}",
                    base + timedelta(microseconds=i * messages + j),
                    {"temperature": 20.0 + j, "humidity": float(j), "seq": float(i)},
                )
                for j in range(messages)
            ]
            columns = telemetry_columns(readings)
            started = time.perf_counter()
            if kind == "marking":
                await conn.execute(INSERT_TELEMETRY_MARKING_LATE, *columns, now - LATE_AFTER)
            else:
                await conn.execute(INSERT_TELEMETRY, *columns)
            timings[kind].append((time.perf_counter() - started) * 1000)
        marks = await conn.fetchval("SELECT count(*) FROM telemetry_rollup_dirty")
    finally:
        await conn.close()
        admin = await asyncpg.connect(server_url())
        await admin.execute('DROP DATABASE IF EXISTS "iot_bench_late_marks" WITH (FORCE)')
        await admin.close()
    plain, marking = (statistics.median(timings[k]) for k in ("plain", "marking"))
    print(f"{batches} batches of each, {messages} readings x 3 metrics, {devices} devices, {marks} marks")
    print(f"plain   {plain:7.1f} ms per batch ({plain / messages * 1000:5.1f} us per reading)")
    print(f"marking {marking:7.1f} ms per batch ({marking / messages * 1000:5.1f} us per reading)")
    print(f"marking costs {marking / plain:.2f} x the plain statement")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--devices", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(main(args.batches, args.messages, args.devices))
