"""Fan-out benchmark of ``iot-realtime``: C WebSocket clients, each subscribed to one of D devices, while
R readings/s are published on Redis. Reports delivered frames/s and the delay from Redis publish to
client receipt (p50/p99), plus the service's CPU and memory.

Everything runs on 127.0.0.1: a private redis-server on a free port, the service as a process, the clients
in separate processes (``--client-procs``), the publisher here. The event's ``ts`` is the publish time, and
every process reads the same clock, so the delay is measured without a side channel.

    python bench/bench_fanout.py                 # default scenarios, about a minute and a half
    python bench/bench_fanout.py --hold-10k      # 10,000 connections held by one service process
    python bench/bench_fanout.py --clients 2000 --devices 200 --rate 1000 --duration 10
    python bench/bench_fanout.py --clients 20 --devices 100 --rate 1000 --wildcard  # each client: "*"

The machine is shared and has 2 cores: the service, Redis, the publisher and the clients compete for them,
so figures are noisy and pessimistic for the service alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import redis.asyncio as aioredis

from iot_common.messages import TelemetryEvent, encode_event
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_common.topics import RedisNames

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_ingest import drop_database, prepare_database
from iot_testkit.measure import cpu_seconds, percentile, rss_mib
from iot_testkit.metrics import metric
from iot_testkit.processes import BIN, JWT_SECRET, free_port, private_redis, start_listening
from iot_testkit.tokens import user_token
from iot_testkit.waiting import WaitTimeout, wait_until

NAMES = RedisNames()  # the default IOT_REDIS_PREFIX of the services here


@dataclass(frozen=True)
class Scenario:
    clients: int
    devices: int
    rate: int
    duration: float
    wildcard: bool = False
    """Every client subscribes to ``"*"`` (every event of the tenant) instead of one device."""


@dataclass
class RoundResult:
    scenario: Scenario
    delivered: int
    expected: int
    rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_pct: float
    cpu_us_per_reading: float
    """The service's CPU time per reading published (the cost of one event through the hub)."""
    cpu_us_per_frame: float
    """The service's CPU time per frame delivered."""
    rss_mb: float
    dropped: int


def raise_fd_limit() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@contextlib.contextmanager
def realtime_service(redis_url: str, database_url: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {
        **os.environ,
        "IOT_REDIS_URL": redis_url,
        "IOT_DATABASE_URL": database_url,
        # Every client uses one credential here: the per-credential limits would refuse all but 100.
        "IOT_REALTIME_MAX_CONNECTIONS_PER_PRINCIPAL": "1000000",
        "IOT_REALTIME_MAX_SUBSCRIPTIONS_PER_PRINCIPAL": "10000000",
        "IOT_REALTIME_MAX_CONNECTIONS": "1000000",
        # ... and the per-credential rate of subscribe frames that ask PostgreSQL all but 120 a minute.
        "IOT_REALTIME_DEVICE_CHECKS_PER_MINUTE": "0",
        "IOT_REALTIME_PORT": str(port),
        "IOT_JWT_SECRET": JWT_SECRET,
        "IOT_LOG_FORMAT": "json",
        "IOT_LOG_LEVEL": "warning",
        "IOT_DATABASE_POOL_MIN": "1",
        "IOT_DATABASE_POOL_MAX": "2",
    }
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        log = Path(tmp) / "iot-realtime.log"
        proc = start_listening([str(BIN / "iot-realtime")], port, "iot-realtime", log, timeout=20, env=env)
        try:
            yield port, proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.returncode not in (0, -15):
                print(log.read_text(errors="replace")[-2000:], file=sys.stderr)


# -- client processes -----------------------------------------------------------------------------------


class _Probe(msgspec.Struct):
    ts: datetime


def client_process(url: str, devices: list[str], commands: Any, results: Any, index: int) -> None:
    raise_fd_limit()
    asyncio.run(_clients(url, devices, commands, results, index))


async def _clients(url: str, devices: list[str], commands: Any, results: Any, index: int) -> None:
    decoder = msgspec.json.Decoder(_Probe)
    delays = array("d")
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        gate = asyncio.Semaphore(32)
        close_timeout = aiohttp.ClientWSTimeout(ws_close=5)

        async def connect(i: int, device_id: str) -> aiohttp.ClientWebSocketResponse:
            async with gate:
                ws = await session.ws_connect(url, compress=0, max_msg_size=0, timeout=close_timeout)
                await ws.send_str(json.dumps({"type": "subscribe", "id": i, "devices": [device_id]}))
                while True:
                    msg = await ws.receive(timeout=60)
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        raise RuntimeError(f"subscribe failed: {msg}")
                    if '"ack"' in msg.data:
                        return ws
                    if '"error"' in msg.data:
                        raise RuntimeError(f"subscribe refused: {msg.data}")

        sockets = await asyncio.gather(*(connect(i, d) for i, d in enumerate(devices)))

        async def read(ws: aiohttp.ClientWebSocketResponse) -> None:
            async for msg in ws:
                now = time.time()
                delays.append(now - decoder.decode(msg.data).ts.timestamp())

        readers = [asyncio.create_task(read(ws)) for ws in sockets]
        # The clients' own GC pauses would be counted as the service's delay: keep them out of the way.
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        results.put((index, "ready", len(sockets)))
        while True:
            command = await loop.run_in_executor(None, commands.get)
            if command == "collect":
                results.put((index, "samples", delays.tobytes()))
                del delays[:]
            else:
                break
        for task in readers:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    results.put((index, "stopped", 0))


class ClientFleet:
    """``clients`` WebSocket clients spread over ``procs`` processes; client i watches device i % D."""

    def __init__(self, port: int, clients: int, devices: list[str], procs: int) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(procs)]
        url = f"http://127.0.0.1:{port}/ws?token=" + user_token(JWT_SECRET, "bench", ttl_s=3600)
        assignments = [[devices[i % len(devices)] for i in range(p, clients, procs)] for p in range(procs)]
        self.procs = [
            ctx.Process(target=client_process, args=(url, a, self.commands[p], self.results, p), daemon=True)
            for p, a in enumerate(assignments)
        ]

    def start(self, timeout: float) -> int:
        for proc in self.procs:
            proc.start()
        connected = 0
        for _ in self.procs:
            _, kind, value = self.results.get(timeout=timeout)
            assert kind == "ready", kind
            connected += value
        return connected

    def collect(self) -> list[float]:
        for queue in self.commands:
            queue.put("collect")
        samples = array("d")
        for _ in self.procs:
            _, kind, value = self.results.get(timeout=60)
            assert kind == "samples", kind
            samples.frombytes(value)
        return list(samples)

    def collect_until(self, expected: int, timeout: float) -> list[float]:
        """Collect until ``expected`` delays arrived (frames still in flight) or ``timeout`` passed: what
        has not arrived by then counts as lost."""
        arrived: list[float] = []

        def all_arrived() -> bool:
            arrived.extend(self.collect())
            return len(arrived) >= expected

        with contextlib.suppress(WaitTimeout):
            wait_until(all_arrived, timeout, "every frame at the clients", interval=0.2)
        return arrived

    def stop(self) -> None:
        for queue in self.commands:
            queue.put("stop")
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()


# -- publisher ------------------------------------------------------------------------------------------


async def publish(redis_url: str, devices: list[str], rate: int, duration: float) -> int:
    """Publish ``rate`` telemetry events/s, round-robin over ``devices``, for ``duration`` seconds."""
    client = aioredis.from_url(redis_url)
    channels = [NAMES.device_channel(DEFAULT_TENANT_ID, d) for d in devices]
    sent = 0
    start = time.monotonic()
    try:
        total = int(duration * rate)
        while sent < total:
            due = min(int((time.monotonic() - start) * rate), total) - sent
            if due > 0:
                async with client.pipeline(transaction=False) as pipe:
                    for i in range(sent, sent + due):
                        device_id = devices[i % len(devices)]
                        event = TelemetryEvent(device_id, datetime.now(UTC), {"temperature": 20.0 + i % 10})
                        pipe.publish(channels[i % len(channels)], encode_event(event))
                    await pipe.execute()
                sent += due
            await asyncio.sleep(0.005)
    finally:
        await client.aclose()
    return sent


def run_scenario(scenario: Scenario, rounds: int, procs: int) -> list[RoundResult]:
    devices = [f"bench-{i}" for i in range(scenario.devices)]
    results = []
    # The service accepts subscriptions only to registered devices: a database of this run registers them.
    database_url = asyncio.run(prepare_database(devices))
    with (
        contextlib.ExitStack() as cleanup,
        private_redis() as redis,
        realtime_service(redis.url, database_url) as (port, service),
    ):
        cleanup.callback(lambda: asyncio.run(drop_database(database_url)))
        base = f"http://127.0.0.1:{port}"
        fleet = ClientFleet(port, scenario.clients, ["*"] if scenario.wildcard else devices, procs)
        started = time.monotonic()
        connected = fleet.start(timeout=300)
        print(
            f"  {connected} clients connected and subscribed in {time.monotonic() - started:.1f}s; "
            f"service pid {service.pid}, RSS {rss_mib(service.pid):.0f} MB, "
            f"connections gauge {metric(base, 'iot_realtime_connections'):.0f}",
            flush=True,
        )
        try:
            fleet.collect()  # discard anything before the first round
            for _ in range(rounds):
                cpu_before = cpu_seconds([service.pid])[service.pid]
                sent = asyncio.run(publish(redis.url, devices, scenario.rate, scenario.duration))
                per_device = [0] * scenario.devices
                for i in range(scenario.clients):
                    per_device[i % scenario.devices] += 1
                expected = sum(per_device[i % scenario.devices] for i in range(sent))
                if scenario.wildcard:
                    expected = sent * scenario.clients
                delays = sorted(fleet.collect_until(expected, timeout=10))
                # Until the last frame arrived: a service that falls behind works on after the publisher
                # stopped, and that CPU is part of what the readings cost.
                cpu = cpu_seconds([service.pid])[service.pid] - cpu_before
                results.append(
                    RoundResult(
                        scenario=scenario,
                        delivered=len(delays),
                        expected=expected,
                        rate=len(delays) / scenario.duration,
                        p50_ms=percentile(delays, 0.50) * 1000,
                        p99_ms=percentile(delays, 0.99) * 1000,
                        max_ms=(delays[-1] if delays else float("nan")) * 1000,
                        cpu_pct=100 * cpu / scenario.duration,
                        cpu_us_per_reading=1e6 * cpu / max(sent, 1),
                        cpu_us_per_frame=1e6 * cpu / max(len(delays), 1),
                        rss_mb=rss_mib(service.pid),
                        dropped=int(metric(base, "iot_realtime_dropped_connections_total")),
                    )
                )
                print(f"  round: {format_row(results[-1])}", flush=True)
        finally:
            fleet.stop()
    return results


HEADER = (
    f"{'clients':>7} {'devices':>7} {'readings/s':>10} {'delivered/s':>11} {'lost':>6} "
    f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'svc CPU%':>8} {'µs/read':>7} {'µs/frame':>8} "
    f"{'RSS MB':>7} {'dropped':>7}"
)


def format_row(r: RoundResult) -> str:
    s = r.scenario
    return (
        f"{s.clients:>7} {s.devices:>7} {s.rate:>10} {r.rate:>11.0f} {r.expected - r.delivered:>6} "
        f"{r.p50_ms:>7.1f} {r.p99_ms:>7.1f} {r.max_ms:>7.1f} {r.cpu_pct:>8.0f} {r.cpu_us_per_reading:>7.1f} "
        f"{r.cpu_us_per_frame:>8.1f} {r.rss_mb:>7.0f} "
        f"{r.dropped:>7}"
    )


def median_row(rounds: list[RoundResult]) -> RoundResult:
    def med(attr: str) -> Any:
        return statistics.median(getattr(r, attr) for r in rounds)

    return RoundResult(
        scenario=rounds[0].scenario,
        delivered=int(med("delivered")),
        expected=int(med("expected")),
        rate=med("rate"),
        p50_ms=med("p50_ms"),
        p99_ms=med("p99_ms"),
        max_ms=med("max_ms"),
        cpu_pct=med("cpu_pct"),
        cpu_us_per_reading=med("cpu_us_per_reading"),
        cpu_us_per_frame=med("cpu_us_per_frame"),
        rss_mb=med("rss_mb"),
        dropped=max(r.dropped for r in rounds),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, help="concurrent WebSocket clients (up to 10,000)")
    parser.add_argument("--devices", type=int, help="devices; client i subscribes to device i %% D")
    parser.add_argument("--rate", type=int, help="readings published per second")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of publishing per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per scenario (medians reported)")
    parser.add_argument("--client-procs", type=int, default=2, help="client processes")
    parser.add_argument("--hold-10k", action="store_true", help="10,000 clients over 1,000 devices")
    parser.add_argument("--wildcard", action="store_true", help='every client subscribes to "*"')
    args = parser.parse_args()
    limit = raise_fd_limit()
    if args.hold_10k:
        scenarios = [Scenario(10_000, 1_000, args.rate or 1_000, args.duration)]
        args.client_procs = max(args.client_procs, 4)
    elif args.clients or args.devices or args.rate:
        scenarios = [
            Scenario(
                args.clients or 1000, args.devices or 100, args.rate or 2000, args.duration, args.wildcard
            )
        ]
    else:
        # The target case (1,000 clients, 2,000 readings/s) with one device per client, then with ten
        # clients per device (ten times the frames out).
        scenarios = [Scenario(1000, 1000, 2000, args.duration), Scenario(1000, 100, 2000, args.duration)]
    if max(s.clients for s in scenarios) // args.client_procs + 100 > limit:
        print(f"RLIMIT_NOFILE hard limit {limit} is too low for this many clients per process")
        return 2
    print(f"fan-out benchmark, {os.cpu_count()} CPUs (shared machine: figures are noisy)", flush=True)
    summary = []
    for scenario in scenarios:
        print(f"scenario {scenario}", flush=True)
        summary.append(median_row(run_scenario(scenario, args.rounds, args.client_procs)))
    print(f"\nmedians over {args.rounds} round(s) of {args.duration:.0f}s each")
    print(HEADER)
    for row in summary:
        print(format_row(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
