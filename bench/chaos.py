"""Faults under load: kill, restart and cut each part of the platform while readings flow.

The platform, the faults and the checks are iot_testkit.chaos (shared with tests/e2e/test_chaos.py, the
smallest version, part of ``make test``); this script runs every fault at a higher rate and longer:

- ingest: kill -9 iot-ingest, restart; realtime: kill -9 iot-realtime, restart; redis: kill -9 Redis,
  restart; broker: restart Mosquitto (SIGTERM, persistence); postgres: cut PostgreSQL for 10 s.

After each: every reading the broker acknowledged is stored exactly once, and the WebSocket clients
receive readings published after the repair again.

    uv run python bench/chaos.py [--rate 1000] [--phase 25] [--only ingest,realtime,redis,broker,postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_ingest import drop_database, prepare_database  # noqa: E402
from iot_testkit.chaos import HEADER, Outcome, Platform, format_outcome  # noqa: E402
from iot_testkit.loadgen import device_ids  # noqa: E402
from iot_testkit.processes import ServiceProcess  # noqa: E402


async def run(args: argparse.Namespace) -> list[Outcome]:
    devices = device_ids(f"chaos{uuid.uuid4().hex[:6]}", args.devices)
    db_url = await prepare_database(devices)
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)

    def start(script: str, env: Mapping[str, str]) -> ServiceProcess:
        return ServiceProcess(script, env, artifacts).start()

    tmp = Path(tempfile.mkdtemp(prefix="chaos-"))
    platform = Platform(start, db_url, devices, tmp)
    outcomes: list[Outcome] = []
    faults: dict[str, tuple[str, Callable[[], Awaitable[float]], bool]] = {
        "ingest": ("kill -9 iot-ingest, restart", platform.kill_ingest, False),
        "realtime": ("kill -9 iot-realtime, restart", platform.kill_realtime, True),
        "redis": ("kill -9 Redis, restart", platform.restart_redis, True),
        "broker": ("restart Mosquitto (SIGTERM, persistence)", platform.restart_broker, False),
        "postgres": ("PostgreSQL cut for 10 s (TCP proxy)", platform.cut_postgres, False),
    }
    try:
        await platform.start(args.clients)
        print(
            f"chaos: {args.rate:,.0f} msg/s, {args.devices} devices, fault {args.fault_at:.0f} s into each "
            f"{args.phase:.0f} s phase\n\n{HEADER}",
            flush=True,
        )
        for key in args.only.split(","):
            name, fault, lossy = faults[key]
            outcomes.append(
                await platform.scenario(
                    name, fault, rate=args.rate, phase_s=args.phase, fault_at_s=args.fault_at, ws_lossy=lossy
                )
            )
    finally:
        await platform.stop()
        await drop_database(db_url)
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description="faults under load")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--phase", type=float, default=25.0, help="seconds of publishing per fault")
    parser.add_argument("--fault-at", type=float, default=5.0, help="seconds into the phase")
    parser.add_argument("--only", default="ingest,realtime,redis,broker,postgres")
    args = parser.parse_args()
    outcomes = asyncio.run(run(args))
    print(f"\npython bench/chaos.py {' '.join(sys.argv[1:])}  ({os.cpu_count()} shared cores)\n\n{HEADER}")
    for o in outcomes:
        print(format_outcome(o) + (f" {'; '.join(o.notes)}" if o.notes else ""))
    failed = [o.fault for o in outcomes if not o.ok]
    print(
        "\nall acknowledged readings stored exactly once, WebSocket clients resumed"
        if not failed
        else f"\nFAILED: {failed}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
