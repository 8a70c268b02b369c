"""End-to-end benchmark: MQTT publish -> iot-ingest -> PostgreSQL + Redis -> iot-realtime -> WebSocket.

Everything on 127.0.0.1: a private Mosquitto (the tests' configuration), a private PostgreSQL cluster
(``initdb`` with the machine's binaries; ``--postgres shared`` for a database on the local server instead)
and a private redis-server, so that only the run's processes are counted; ``iot-ingest`` and
``iot-realtime`` as processes; the publisher in its own process (open loop: a fixed offered rate, QoS 1,
PUBACKs counted; ``ts`` = the time the message was scheduled to go out) and WebSocket clients in another,
subscribed to every device and timing publish -> receipt. Per offered rate: delivered msg/s, publish rate,
loss as set differences (PUBACKed vs stored vs received), p50/p95/p99/max delay, CPU of each process and
per delivered message. The knee is bisected between the grid's points. Baselines measured first in the
same run: the raw broker rate (same publisher into a bare subscriber) and the raw PostgreSQL COPY rate
(asyncpg ``copy_records_to_table``, 3 rows per message, into a telemetry-shaped table).

    uv run python bench/bench_e2e.py                              # sweep 1k..20k msg/s, ~4 minutes
    uv run python bench/bench_e2e.py --rates 1000,5000,10000,20000,40000 --duration 20
    uv run python bench/bench_e2e.py --soak 600 --soak-rate 3000  # 10 minutes at a fixed rate
    uv run python bench/bench_e2e.py --profile-rate 8000          # py-spy the services at one rate

Writes e2e_*.png and e2e_results.json under ``--out`` (default artifacts/bench_e2e; docs/img as well with
``--publish``) and prints a markdown table.
The machine has 2 cores shared by all of the above (and by other people's tests): figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_ingest import POSTGRES, drop_database, prepare_database, raw_run  # noqa: E402
from iot_testkit.fleet import ClientFleet, Samples  # noqa: E402
from iot_testkit.loadgen import device_ids  # noqa: E402
from iot_testkit.measure import (  # noqa: E402
    cpu_seconds,
    cpu_used,
    percentile,
    postgres_aux_pids,
    rss_mib,
)
from iot_testkit.metrics import metric  # noqa: E402
from iot_testkit.processes import (  # noqa: E402
    BIN,
    Broker,
    PostgresServer,
    RedisServer,
    ServiceProcess,
    free_port,
)
from iot_testkit.publisher import read_published, start_publisher  # noqa: E402
from iot_testkit.sweep import bisect_knee, cpu_us_per_message, handled, losses  # noqa: E402
from iot_testkit.waiting import WaitTimeout, wait_until  # noqa: E402

GROUPS = ("broker", "postgres", "redis", "ingest", "realtime", "loadgen", "clients")
PLATFORM = ("broker", "postgres", "redis", "ingest", "realtime")
"""The processes whose CPU a reading costs end to end (``cpu_us_per_msg``)."""


@dataclass
class Step:
    offered: float
    sent: int
    acked: int
    stored: int
    ws_received: int
    delivered_rate: float
    """Distinct readings received by the WebSocket clients / time from the first publish to the last."""
    publish_rate: float
    """PUBACKed messages / time from the first publish to the last PUBACK: what the publisher achieved."""
    lost_stored: int
    """PUBACKed, never stored."""
    lost_ws: int
    """Stored, never received on a WebSocket."""
    stored_unacked: int
    """Stored although the publisher saw no PUBACK (allowed with QoS 1; not a loss)."""
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    drain_s: float
    """From the last publish until the last reading reached the WebSocket clients."""
    cpu_pct: dict[str, float]
    cpu_us_per_msg: float
    """CPU of broker + PostgreSQL + Redis + ingest + realtime over the step, per delivered reading."""
    rss_start_mb: dict[str, float]
    rss_mb: dict[str, float]
    started_at: float
    ended_at: float
    probe: bool = False
    """A step of the knee's bisection (not a point of the grid)."""

    @property
    def handled(self) -> bool:
        return handled(self.offered, self.delivered_rate, self.p99_ms)


@dataclass
class Run:
    machine: dict[str, Any]
    command: str
    raw_broker_rate: float = 0.0
    raw_copy_rate: float = 0.0
    knee_rate: float = 0.0
    """The highest offered rate handled (see :func:`iot_testkit.sweep.handled`), bisected."""
    steps: list[Step] = field(default_factory=list)
    soak: list[Step] = field(default_factory=list)
    timeline: list[tuple[float, float]] = field(default_factory=list)
    """(time, readings stored so far) sampled from iot-ingest's /metrics."""
    received_per_s: list[tuple[int, int]] = field(default_factory=list)


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    return {"nproc": os.cpu_count(), "cpu": model, "memory_mb": mem, "python": sys.version.split()[0]}


def ingest_stored(base: str) -> float:
    return metric(base, "iot_ingest_readings_stored_total")


async def copy_rate(db_url: str, messages: int) -> float:
    """Raw COPY: ``messages`` readings (3 rows each) into a telemetry-shaped table, 2,000 per COPY."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "CREATE TABLE copy_baseline (device_id text NOT NULL, metric text NOT NULL, "
            "ts timestamptz NOT NULL, value double precision, value_text text, "
            "PRIMARY KEY (device_id, metric, ts))"
        )
        start = datetime.now(UTC)
        records = [
            (f"copy-{i % 100:05d}", metric, start + timedelta(microseconds=i), float(i % 100), None)
            for i in range(messages)
            for metric in ("temperature", "humidity", "seq")
        ]
        began = time.perf_counter()
        for lo in range(0, len(records), 6000):
            async with conn.transaction():
                await conn.copy_records_to_table("copy_baseline", records=records[lo : lo + 6000])
        rate = messages / (time.perf_counter() - began)
        await conn.execute("DROP TABLE copy_baseline")
        return rate
    finally:
        await conn.close()


async def stored_between(db_url: str, lo: int, hi: int) -> set[int]:
    """The sequence numbers ``lo <= seq < hi`` of the readings stored."""
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch(
            "SELECT DISTINCT value FROM telemetry WHERE metric = 'seq' AND value >= $1 AND value < $2",
            float(lo),
            float(hi),
        )
        return {int(r["value"]) for r in rows}
    finally:
        await conn.close()


async def exactly_once(db_url: str) -> tuple[int, int, int]:
    """(readings, rows, readings not stored as exactly 3 rows) over the whole run."""
    conn = await asyncpg.connect(db_url)
    try:
        readings = await conn.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM telemetry GROUP BY device_id, ts) r"
        )
        rows = await conn.fetchval("SELECT count(*) FROM telemetry")
        bad = await conn.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM telemetry GROUP BY device_id, ts HAVING count(*) <> 3) r"
        )
        return int(readings), int(rows), int(bad)
    finally:
        await conn.close()


async def backend_pids(db_url: str) -> list[int]:
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return [int(r["pid"]) for r in rows]
    finally:
        await conn.close()


class Bench:
    """The running platform and the instruments around it."""

    def __init__(
        self,
        args: argparse.Namespace,
        db_url: str,
        broker: Broker,
        redis: RedisServer,
        devices: list[str],
        postgres: PostgresServer | None,
    ) -> None:
        self.args = args
        self.db_url = db_url
        self.postgres = postgres
        self.broker = broker
        self.redis = redis
        self.devices = devices
        self.prefix = devices[0].rsplit("-", 1)[0]
        self.artifacts = ROOT / "artifacts"
        self.artifacts.mkdir(exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
        self.ingest_port, self.realtime_port = free_port(), free_port()
        self.ingest_base = f"http://127.0.0.1:{self.ingest_port}"
        self.seq = 0
        self.pg_aux = postgres_aux_pids()
        self.timeline: list[tuple[float, float]] = []
        self.received = Samples.empty()
        self._sampling = threading.Event()
        self.services: dict[str, ServiceProcess] = {}
        self.fleet: ClientFleet | None = None

    def start(self, profile: bool = False) -> None:
        common = {
            "IOT_DATABASE_URL": self.db_url,
            "IOT_REDIS_URL": self.redis.url,
            "IOT_LOG_LEVEL": "warning",
        }
        envs = {
            "iot-ingest": {
                **common,
                "IOT_MQTT_URL": self.broker.url,
                "IOT_MQTT_SHARE_GROUP": f"bench-{self.prefix}",
                "IOT_MQTT_CLIENT_ID": f"bench-{self.prefix}",
                "IOT_INGEST_HTTP_PORT": str(self.ingest_port),
                **dict(kv.split("=", 1) for kv in self.args.env),
            },
            "iot-realtime": {
                **common,
                "IOT_REALTIME_PORT": str(self.realtime_port),
                # Bursts at the top rates queue up behind a busy CPU: keep them rather than drop the client.
                "IOT_REALTIME_QUEUE_SIZE": "100000",
                # Every client uses one credential: lift the per-credential connection limit (100).
                "IOT_REALTIME_MAX_CONNECTIONS_PER_PRINCIPAL": "1000000",
                "IOT_DATABASE_POOL_MIN": "1",
                "IOT_DATABASE_POOL_MAX": "2",
            },
        }
        for script, env in envs.items():
            proc = ServiceProcess(script, env, self.artifacts)
            if profile:
                out = self.artifacts / f"bench_e2e_{script}.txt"
                spy = [str(BIN / "py-spy"), "record", "-o", str(out), "-f", "raw", "-r", "100", "--"]
                proc.proc = subprocess.Popen(
                    [*spy, str(BIN / script)], env=proc.env, stdout=subprocess.DEVNULL
                )
            else:
                proc.start()
            self.services[script] = proc
        self.services["iot-ingest"].wait_http(f"{self.ingest_base}/readyz")
        self.services["iot-realtime"].wait_http(f"http://127.0.0.1:{self.realtime_port}/readyz")
        self.fleet = ClientFleet(self.realtime_port, self.devices, self.args.clients)
        self.fleet.start()
        self._sampling.set()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while self._sampling.is_set():
            with contextlib.suppress(httpx.HTTPError):
                self.timeline.append((time.time(), ingest_stored(self.ingest_base)))
            time.sleep(0.5)

    def service_pid(self, script: str) -> int:
        """The service's own pid (under py-spy, the child of py-spy)."""
        import psutil

        proc = self.services[script].proc
        assert proc is not None
        children = psutil.Process(proc.pid).children()
        return (
            children[0].pid
            if children and "py-spy" in " ".join(psutil.Process(proc.pid).cmdline())
            else proc.pid
        )

    def pids(self) -> dict[str, list[int]]:
        assert self.fleet is not None
        return {
            "broker": [self.broker.pid],
            "postgres": (
                self.postgres.pids()
                if self.postgres is not None
                else asyncio.run(backend_pids(self.db_url)) + self.pg_aux
            ),
            "redis": [self.redis.pid],
            "ingest": [self.service_pid("iot-ingest")],
            "realtime": [self.service_pid("iot-realtime")],
            "clients": [self.fleet.pid],
        }

    def rss(self) -> dict[str, float]:
        return {
            "ingest": rss_mib(self.service_pid("iot-ingest")),
            "realtime": rss_mib(self.service_pid("iot-realtime")),
            "broker": rss_mib(self.broker.pid),
        }

    def step(self, rate: float, duration: float, probe: bool = False) -> Step:
        """Publish at ``rate`` for ``duration`` s; wait until all is stored and delivered; measure."""
        assert self.fleet is not None
        messages = int(rate * duration)
        lo, hi = self.seq, self.seq + messages
        self.seq = hi
        pids = self.pids()
        cpu0 = {g: cpu_seconds(p) for g, p in pids.items()}
        stored0 = ingest_stored(self.ingest_base)
        rss_start = self.rss()
        out = self.tmp / f"pub-{lo}.json"
        t0 = time.time()
        pub = start_publisher(self.broker.url, self.prefix, len(self.devices), messages, rate, lo, out)
        pub.wait(duration + 300)
        published = read_published(out)
        # Bounded waits: what is not stored or delivered in time is reported as lost.
        with contextlib.suppress(WaitTimeout):
            wait_until(
                lambda: ingest_stored(self.ingest_base) >= stored0 + published.acked,
                300,
                "every acknowledged reading stored",
            )
        # The WebSocket clients: every reading of this step, or 10 s after storage caught up.
        samples = Samples.empty()

        def all_received() -> bool:
            assert self.fleet is not None
            got = self.fleet.collect()
            samples.extend(got)
            self.received.extend(got)
            return sum(1 for s in samples.seq if lo <= s < hi) >= published.acked

        with contextlib.suppress(WaitTimeout):
            wait_until(all_received, 10, "every reading on the WebSocket", interval=0.1)
        t_end = time.time()
        # Enumerated again: processes started during the step (new backends) count too.
        used = {g: cpu_used(cpu0[g], cpu_seconds(p)) for g, p in self.pids().items()}
        cpu = {g: 100 * s / (t_end - t0) for g, s in used.items()}
        cpu["loadgen"] = 100 * published.cpu_s / (t_end - t0)
        stored = asyncio.run(stored_between(self.db_url, lo, hi))
        mine: dict[int, tuple[float, float]] = {}
        for at, d, s in zip(samples.received_at, samples.delay, samples.seq, strict=True):
            if lo <= s < hi and s not in mine:
                mine[s] = (at, d)
        delays = sorted(d for _, d in mine.values())
        last_at = max((at for at, _ in mine.values()), default=t_end)
        publish_end = published.started_at + published.elapsed_s
        lost = losses(published.acked_seqs, stored, mine)
        step = Step(
            offered=rate,
            sent=published.sent,
            acked=published.acked,
            stored=len(stored),
            ws_received=len(mine),
            delivered_rate=len(mine) / (last_at - published.started_at) if mine else 0.0,
            publish_rate=published.acked / published.elapsed_s if published.elapsed_s else 0.0,
            lost_stored=lost.lost_stored,
            lost_ws=lost.lost_ws,
            stored_unacked=lost.stored_unacked,
            p50_ms=percentile(delays, 0.50) * 1000,
            p95_ms=percentile(delays, 0.95) * 1000,
            p99_ms=percentile(delays, 0.99) * 1000,
            max_ms=(delays[-1] if delays else float("nan")) * 1000,
            drain_s=max(0.0, last_at - publish_end),
            cpu_pct=cpu,
            cpu_us_per_msg=cpu_us_per_message(used, PLATFORM, len(mine)),
            rss_start_mb=rss_start,
            rss_mb=self.rss(),
            started_at=t0,
            ended_at=t_end,
            probe=probe,
        )
        print(format_step(step), flush=True)
        return step

    def stop(self) -> None:
        self._sampling.clear()
        if self.fleet is not None:
            self.fleet.stop()
        for script, proc in self.services.items():
            if proc.proc is None:
                continue
            pid = self.service_pid(script)
            if pid != proc.proc.pid:  # under py-spy: stop the service, py-spy writes its output and exits
                os.kill(pid, 15)
                proc.proc.wait(60)
            else:
                proc.stop()


HEADER = (
    "| offered msg/s | publish msg/s | delivered msg/s | acked | lost (stored) | lost (WS) | p50 ms | p95 ms "
    "| p99 ms | max ms | drain s | CPU µs/msg | CPU % broker / pg / redis / ingest / realtime / loadgen / "
    "clients |\n"
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
)


def format_step(s: Step) -> str:
    cpu = " / ".join(f"{s.cpu_pct.get(g, 0):.0f}" for g in GROUPS)
    offered = f"{s.offered:,.0f}" + (" (probe)" if s.probe else "")
    return (
        f"| {offered} | {s.publish_rate:,.0f} | {s.delivered_rate:,.0f} | {s.acked:,} | {s.lost_stored} "
        f"| {s.lost_ws} | {s.p50_ms:.1f} | {s.p95_ms:.1f} | {s.p99_ms:.1f} | {s.max_ms:.0f} "
        f"| {s.drain_s:.1f} | {s.cpu_us_per_msg:.0f} | {cpu} |"
    )


def plots(run: Run, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if run.steps:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        grid = sorted(run.steps, key=lambda s: s.offered)
        rates = [s.offered for s in grid]
        for attr, label in (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"), ("max_ms", "max")):
            ax.plot(rates, [getattr(s, attr) for s in grid], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered rate (messages/s)")
        ax.set_ylabel("publish -> WebSocket delay (ms)")
        if run.knee_rate:
            ax.axvline(run.knee_rate, color="grey", linestyle=":", label=f"knee {run.knee_rate:,.0f}/s")
        ax.axhline(25, color="red", linestyle="--", linewidth=0.8, label="25 ms goal")
        ax.set_title(f"End-to-end delay vs offered rate ({run.machine['nproc']} shared cores)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        files.append(out / "e2e_latency.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    if run.timeline:
        t0 = run.timeline[0][0]
        fig, ax = plt.subplots(figsize=(9, 4.2))
        xs, ys = [], []
        for (ta, a), (tb, b) in zip(run.timeline, run.timeline[1:], strict=False):
            if tb > ta:
                xs.append(tb - t0)
                ys.append((b - a) / (tb - ta))
        ax.plot(xs, ys, label="stored (ingest commits)/s", linewidth=1)
        ax.plot(
            [t - t0 for t, _ in run.received_per_s],
            [n for _, n in run.received_per_s],
            label="received by WebSocket clients/s",
            linewidth=1,
            alpha=0.8,
        )
        for s in run.steps + run.soak:
            ax.hlines(
                s.offered,
                s.started_at - t0,
                s.started_at - t0 + s.acked / s.offered,
                colors="grey",
                linestyles="--",
                linewidth=1,
            )
        ax.plot([], [], color="grey", linestyle="--", label="offered")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("messages/s")
        ax.set_title("Throughput over the run")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        files.append(
            out / ("e2e_soak_throughput.png" if run.soak and not run.steps else "e2e_throughput.png")
        )
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description="end-to-end benchmark: MQTT -> PostgreSQL -> WebSocket")
    parser.add_argument(
        "--rates", default="1000,2000,5000,10000,20000", help="offered msg/s, comma-separated"
    )
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per offered rate")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--clients", type=int, default=10, help="WebSocket connections (devices split)")
    parser.add_argument("--baseline-messages", type=int, default=100_000)
    parser.add_argument("--soak", type=float, default=0.0, help="soak seconds (after the sweep, if any)")
    parser.add_argument("--soak-rate", type=float, default=0.0, help="soak rate (default: half the knee)")
    parser.add_argument(
        "--profile-rate", type=float, default=0.0, help="only this rate, services under py-spy"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="IOT_X=V", help="extra setting for iot-ingest"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "artifacts" / "bench_e2e", help="where results and plots go"
    )
    parser.add_argument("--publish", action="store_true", help="also write the results and plots to docs/img")
    parser.add_argument(
        "--postgres",
        choices=("private", "shared"),
        default="private",
        help="a private PostgreSQL cluster (only its processes counted), or the IOT_TEST_DATABASE_URL server",
    )
    parser.add_argument("--knee-probes", type=int, default=3, help="bisection steps for the knee (0: none)")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r]
    if args.soak and args.soak_rate:
        rates = []
    if args.profile_rate:
        rates = [args.profile_rate]
    run = Run(machine=machine(), command="python bench/bench_e2e.py " + " ".join(sys.argv[1:]))
    print(f"end-to-end benchmark on {run.machine} (shared machine: figures are noisy)", flush=True)
    prefix = f"e2e{uuid.uuid4().hex[:6]}"
    devices = device_ids(prefix, args.devices)
    postgres = PostgresServer().start() if args.postgres == "private" else None
    server = postgres.url if postgres is not None else POSTGRES
    try:
        db_url = asyncio.run(prepare_database(devices, server=server))
    except BaseException:
        if postgres is not None:
            postgres.stop()
        raise
    broker = Broker().start()
    redis = RedisServer().start()
    bench: Bench | None = None
    try:
        if rates and not args.profile_rate:
            runs = [
                raw_run(broker.url, f"raw{prefix}", args.devices, args.baseline_messages) for _ in range(3)
            ]
            run.raw_broker_rate = statistics.median(runs)
            copies = [asyncio.run(copy_rate(db_url, args.baseline_messages)) for _ in range(3)]
            run.raw_copy_rate = statistics.median(copies)
            print(
                f"baselines (medians of 3): raw broker {run.raw_broker_rate:,.0f} msg/s "
                f"{[round(r) for r in runs]}, raw COPY {run.raw_copy_rate:,.0f} msg/s "
                f"{[round(r) for r in copies]} (3 rows each)",
                flush=True,
            )
        bench = Bench(args, db_url, broker, redis, devices, postgres)
        bench.start(profile=bool(args.profile_rate))
        print(HEADER, flush=True)
        for rate in rates:
            run.steps.append(bench.step(rate, args.duration))

        def probe(rate: float) -> bool:
            assert bench is not None
            run.steps.append(bench.step(rate, args.duration, probe=True))
            return run.steps[-1].handled

        if run.steps and not args.profile_rate:
            run.knee_rate, _ = bisect_knee(
                {s.offered: s.handled for s in run.steps}, probe, max_probes=args.knee_probes
            )
        if args.soak:
            rate = args.soak_rate or max(run.knee_rate / 2, 500)
            print(f"soak: {args.soak:.0f} s at {rate:,.0f} msg/s, 60 s per row", flush=True)
            left = args.soak
            while left > 0:
                run.soak.append(bench.step(rate, min(60.0, left)))
                left -= 60.0
        readings, rows, bad = asyncio.run(exactly_once(db_url))
        print(f"whole run: {readings:,} readings, {rows:,} rows, {bad} readings not stored as exactly 3 rows")
    finally:
        if bench is not None:
            bench.stop()
            run.timeline = bench.timeline
            per_s: dict[int, int] = {}
            for at in bench.received.received_at:
                per_s[int(at)] = per_s.get(int(at), 0) + 1
            run.received_per_s = sorted(per_s.items())
        broker.close()
        redis.stop()
        asyncio.run(drop_database(db_url, server))
        if postgres is not None:
            postgres.stop()
    summary(run, args)
    return 0


def summary(run: Run, args: argparse.Namespace) -> None:
    if not args.profile_rate:
        for out in [args.out, *([ROOT / "docs" / "img"] if args.publish else [])]:
            out.mkdir(parents=True, exist_ok=True)
            for path in plots(run, out):
                print(f"plot: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
            name = "e2e_soak.json" if run.soak and not run.steps else "e2e_results.json"
            (out / name).write_text(json.dumps(asdict(run), indent=1, default=str))
            print(f"results: {out / name}")
    print(f"\n{run.command}\n")
    if run.raw_broker_rate:
        print(f"raw broker: {run.raw_broker_rate:,.0f} msg/s; raw COPY: {run.raw_copy_rate:,.0f} msg/s\n")
    print(HEADER)
    for s in run.steps:
        print(format_step(s))
    if run.steps:
        print(f"\nknee: {run.knee_rate:,.0f} msg/s offered", end="")
        best = max(s.delivered_rate for s in run.steps)
        if run.raw_broker_rate:
            print(
                f"; best delivered {best:,.0f} msg/s = {best / run.raw_broker_rate:.2f} x raw broker, "
                f"{best / run.raw_copy_rate:.2f} x raw COPY; "
                f"knee = {run.knee_rate / run.raw_broker_rate:.2f} x raw broker, "
                f"{run.knee_rate / run.raw_copy_rate:.2f} x raw COPY"
            )
        else:
            print()
    if run.soak:
        print("\nsoak (one row per minute)\n")
        print(HEADER)
        for s in run.soak:
            print(format_step(s))
        first, last = run.soak[0], run.soak[-1]
        print(
            "\nRSS MB start -> end: "
            + ", ".join(f"{k} {first.rss_start_mb[k]:.0f} -> {last.rss_mb[k]:.0f}" for k in first.rss_mb)
        )
        lost = sum(s.lost_stored + s.lost_ws for s in run.soak)
        print(f"soak loss: {lost}")


if __name__ == "__main__":
    sys.exit(main())
