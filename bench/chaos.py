"""Faults under load: kill, restart and cut each part of the platform while readings flow.

A private Mosquitto (persistence on a data directory, so the ingest session and its queued messages survive
a broker restart), a private redis-server, a database of this run reached by ``iot-ingest`` through a TCP
proxy that can be cut, ``iot-ingest`` and ``iot-realtime`` as processes, a publisher process at a moderate
rate and WebSocket clients in another process (reconnecting when the gateway goes away).

Each scenario publishes for a while, injects one fault, undoes it, and then checks:

- storage: every reading the broker acknowledged (PUBACK) to the publisher is stored, exactly once (its
  ``seq`` once, and 3 rows per (device, ts));
- WebSocket: the clients receive readings published after the fault again ("resumed": from the repair to
  the first such reading), and readings stored late reach them ("caught up": from the repair until the
  last reading published before the repair arrived). Readings published while Redis or the gateway was
  down are not replayed to WebSocket clients (pub/sub has no history): counted as "WS missed".

    uv run python bench/chaos.py [--rate 1000] [--phase 25] [--only ingest,realtime,redis,broker,postgres]

The smallest version runs in ``make test`` as tests/e2e/test_chaos.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.e2e_support import (  # noqa: E402
    SECRET,
    Broker,
    ClientFleet,
    RedisServer,
    Samples,
    TcpProxy,
    read_published,
    start_publisher,
)
from bench.loadgen import device_ids  # noqa: E402
from tests.support.processes import ServiceProcess, free_port  # noqa: E402

Start = Callable[[str, Mapping[str, str]], ServiceProcess]


@dataclass
class Outcome:
    fault: str
    acked: int
    stored_once: int
    missing: int
    duplicated: int
    extra: int
    """Stored readings the publisher never got a PUBACK for (the broker took them, then went away)."""
    outage_s: float
    resumed_s: float
    caught_up_s: float
    ws_missed: int
    ws_received: int
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.duplicated == 0 and self.resumed_s >= 0


class Platform:
    """The services under test and the handles to break them."""

    def __init__(self, start: Start, database_url: str, devices: list[str], tmp: Path) -> None:
        self._start = start
        self.database_url = database_url
        self.devices = devices
        self.prefix = devices[0].rsplit("-", 1)[0]
        self.tmp = tmp
        self.broker = Broker(persistent=True)
        self.redis = RedisServer()
        parts = urlsplit(database_url)
        self.proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
        netloc = (
            f"{parts.username}@127.0.0.1:{self.proxy.port}"
            if parts.username
            else f"127.0.0.1:{self.proxy.port}"
        )
        self.proxied_url = urlunsplit(parts._replace(netloc=netloc))
        self.ingest_port, self.realtime_port = free_port(), free_port()
        self.ingest: ServiceProcess | None = None
        self.realtime: ServiceProcess | None = None
        self.fleet: ClientFleet | None = None
        self.seq = 0
        self.subscriptions = 0
        self.received = Samples.empty()

    async def start(self, clients: int = 4) -> None:
        self.broker.start()
        self.redis.start()
        await self.proxy.start()
        await self.start_ingest()
        await self.start_realtime()
        self.fleet = ClientFleet(self.realtime_port, self.devices, clients)
        await asyncio.to_thread(self.fleet.start)
        self.subscriptions = self.fleet.groups

    async def start_ingest(self) -> None:
        env = {
            "IOT_DATABASE_URL": self.proxied_url,
            "IOT_REDIS_URL": self.redis.url,
            "IOT_MQTT_URL": self.broker.url,
            "IOT_MQTT_SHARE_GROUP": f"chaos-{self.prefix}",
            "IOT_MQTT_CLIENT_ID": f"chaos-{self.prefix}",
            "IOT_INGEST_HTTP_PORT": str(self.ingest_port),
            "IOT_LOG_LEVEL": "warning",
        }
        self.ingest = self._start("iot-ingest", env)
        # In a thread: the PostgreSQL proxy runs in this event loop and must serve the start-up.
        await asyncio.to_thread(self.ingest.wait_http, f"http://127.0.0.1:{self.ingest_port}/readyz")

    async def start_realtime(self) -> None:
        env = {
            "IOT_DATABASE_URL": self.database_url,
            "IOT_REDIS_URL": self.redis.url,
            "IOT_REALTIME_PORT": str(self.realtime_port),
            "IOT_JWT_SECRET": SECRET,
            "IOT_DATABASE_POOL_MIN": "1",
            "IOT_DATABASE_POOL_MAX": "2",
            "IOT_LOG_LEVEL": "warning",
        }
        self.realtime = self._start("iot-realtime", env)
        await asyncio.to_thread(self.realtime.wait_http, f"http://127.0.0.1:{self.realtime_port}/readyz")

    async def stop(self) -> None:
        if self.fleet is not None:
            await asyncio.to_thread(self.fleet.stop)
        for proc in (self.ingest, self.realtime):
            if proc is not None and proc.proc is not None and proc.proc.poll() is None:
                proc.proc.kill()
                proc.proc.wait()
        with contextlib.suppress(Exception):
            await self.proxy.cut()
        self.redis.stop()
        self.broker.close()

    # -- the faults: each breaks something and repairs it, returning the repair time -------------------

    async def kill_ingest(self) -> float:
        assert self.ingest is not None
        self.ingest.kill()
        await self.start_ingest()
        return time.time()

    async def kill_realtime(self) -> float:
        assert self.realtime is not None
        assert self.fleet is not None
        self.realtime.kill()
        await self.start_realtime()
        repaired = time.time()
        # The clients reconnect and subscribe again by themselves; wait for it (it is part of recovery).
        self.subscriptions += self.fleet.groups
        await asyncio.to_thread(self.fleet.wait_subscribed, self.subscriptions, 30)
        return repaired

    async def restart_redis(self) -> float:
        self.redis.stop(signal.SIGKILL)
        self.redis.start()
        return time.time()

    async def restart_broker(self) -> float:
        self.broker.stop(signal.SIGTERM)
        self.broker.start()
        return time.time()

    async def cut_postgres(self, seconds: float = 10.0) -> float:
        await self.proxy.cut()
        await asyncio.sleep(seconds)
        await self.proxy.start()
        return time.time()

    # -- load and checks --------------------------------------------------------------------------------

    async def publish_for(self, seconds: float, rate: float) -> tuple[set[int], set[int]]:
        """Publish at ``rate`` for ``seconds`` (a new publisher process whenever the broker drops one);
        returns (acknowledged seqs, sent seqs)."""
        acked: set[int] = set()
        sent: set[int] = set()
        end = time.time() + seconds
        while (left := end - time.time()) > 0.2:
            messages = int(left * rate)
            lo = self.seq
            self.seq += messages
            out = self.tmp / f"pub-{lo}.json"
            proc = start_publisher(self.broker.url, self.prefix, len(self.devices), messages, rate, lo, out)
            await asyncio.to_thread(proc.wait, seconds + 120)
            result = read_published(out)
            acked.update(result.acked_seqs)
            sent.update(range(lo, lo + result.sent))
            if result.acked < messages:
                await asyncio.sleep(0.2)
        return acked, sent

    async def stored(self, lo: int, hi: int) -> dict[int, int]:
        """seq -> rows of the ``seq`` metric stored, for ``lo <= seq < hi``."""
        conn = await asyncpg.connect(self.database_url)
        try:
            rows = await conn.fetch(
                "SELECT value::bigint AS seq, count(*) AS n FROM telemetry "
                "WHERE metric = 'seq' AND value >= $1 AND value < $2 GROUP BY 1",
                float(lo),
                float(hi),
            )
            bad = await conn.fetchval(
                "SELECT count(*) FROM (SELECT 1 FROM telemetry GROUP BY device_id, ts HAVING count(*) <> 3) r"
            )
            if bad:
                return {-1: int(bad)}
            return {int(r["seq"]): int(r["n"]) for r in rows}
        finally:
            await conn.close()

    async def scenario(
        self,
        name: str,
        fault: Callable[[], Awaitable[float]],
        *,
        rate: float,
        phase_s: float,
        fault_at_s: float,
        ws_lossy: bool = False,
    ) -> Outcome:
        """Publish for ``phase_s`` s, inject ``fault`` after ``fault_at_s`` s, then check everything."""
        assert self.fleet is not None
        lo = self.seq
        publishing = asyncio.create_task(self.publish_for(phase_s, rate))
        await asyncio.sleep(fault_at_s)
        broken = time.time()
        repaired = await fault()
        acked, sent = await publishing
        hi = self.seq
        deadline = time.monotonic() + 120
        while True:
            stored = await self.stored(lo, hi)
            if acked <= stored.keys() or time.monotonic() > deadline or -1 in stored:
                break
            await asyncio.sleep(0.5)
        # Every stored reading should reach the clients (except what the fault's design loses): wait for it.
        got = Samples.empty()
        ws_deadline = time.monotonic() + (5 if ws_lossy else 30)
        while time.monotonic() < ws_deadline:
            got.extend(await asyncio.to_thread(self.fleet.collect))
            if {s for s in got.seq if lo <= s < hi} >= stored.keys():
                break
            await asyncio.sleep(0.2)
        self.received.extend(got)
        mine = [
            (at, at - d, s)
            for at, d, s in zip(got.received_at, got.delay, got.seq, strict=True)
            if lo <= s < hi
        ]
        fresh = [at for at, published, _ in mine if published > repaired]
        before = [at for at, published, _ in mine if published <= repaired]
        outcome = Outcome(
            fault=name,
            acked=len(acked),
            stored_once=sum(1 for s in acked if stored.get(s) == 1),
            missing=len(acked - stored.keys()),
            duplicated=sum(1 for n in stored.values() if n != 1) + stored.get(-1, 0),
            extra=len(stored.keys() - acked),
            outage_s=repaired - broken,
            resumed_s=(min(fresh) - repaired) if fresh else -1.0,
            caught_up_s=(max(before) - repaired) if before else float("nan"),
            ws_missed=len(stored.keys() - {s for _, _, s in mine}),
            ws_received=len({s for _, _, s in mine}),
        )
        if len(sent) > len(acked):
            outcome.notes.append(f"{len(sent) - len(acked)} sent without PUBACK")
        print(format_outcome(outcome), flush=True)
        return outcome


HEADER = (
    "| fault | acked | stored once | missing | duplicated | stored, not acked | outage s | WS resumed s "
    "| WS caught up s | WS missed |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def format_outcome(o: Outcome) -> str:
    return (
        f"| {o.fault} | {o.acked:,} | {o.stored_once:,} | {o.missing} | {o.duplicated} | {o.extra} "
        f"| {o.outage_s:.1f} | {o.resumed_s:.2f} | {o.caught_up_s:.2f} | {o.ws_missed} |"
    )


async def prepare(devices: list[str]) -> str:
    from bench.bench_ingest import prepare_database

    return await prepare_database(devices)


async def run(args: argparse.Namespace) -> list[Outcome]:
    from bench.bench_ingest import drop_database

    devices = device_ids(f"chaos{uuid.uuid4().hex[:6]}", args.devices)
    db_url = await prepare(devices)
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
