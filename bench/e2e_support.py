"""Pieces shared by the end-to-end benchmark, the chaos script and the chaos e2e test.

- :class:`StampedPayload`: telemetry whose ``ts`` is the publish time (microseconds, as fractional epoch
  milliseconds, strictly increasing within a publisher) and whose ``seq`` metric names the message, so a
  WebSocket client can time publish -> receipt and anyone can match stored rows to PUBACKed messages.
- ``python bench/e2e_support.py publish ...``: an open-loop QoS 1 publisher process (bench/loadgen.py's
  PUBACK-counting client, paced at a fixed rate) that writes the acknowledged sequence numbers to a file.
- :class:`ClientFleet`: WebSocket clients in a separate process, subscribed to the devices, reconnecting
  and resubscribing when the gateway goes away, recording (receipt time, delay, seq) of each reading.
- :class:`Broker`, :class:`RedisServer`: a private Mosquitto / redis-server that can be killed and started
  again on the same port (the broker with persistence, so sessions and queued messages survive).
- :class:`TcpProxy`: a TCP forwarder that can be cut, to make PostgreSQL unreachable for the services.
- :func:`cpu_seconds`, :func:`cpu_used`, :func:`rss_mb`: per-process accounting with psutil.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.loadgen import device_ids, publish_async  # noqa: E402
from tests.support.backends import MOSQUITTO_TEST_CONFIG, port_open  # noqa: E402
from tests.support.processes import free_port  # noqa: E402
from tests.support.tokens import user_token  # noqa: E402

SECRET = secrets.token_urlsafe(48)  # IOT_JWT_SECRET of the realtime service: random per run


class StampedPayload:
    """Three metrics, ``ts`` = publish time in microseconds (unique: bumped by 1 us on a tie)."""

    def __init__(self, seq_offset: int = 0) -> None:
        self.offset = seq_offset
        self.last_us = 0

    def __call__(self, seq: int, _base: int) -> bytes:
        us = time.time_ns() // 1000
        if us <= self.last_us:
            us = self.last_us + 1
        self.last_us = us
        s = self.offset + seq
        return b'{"ts":%d.%03d,"metrics":{"temperature":%.1f,"humidity":%d,"seq":%d}}' % (
            us // 1000,
            us % 1000,
            20 + (s % 100) / 10,
            30 + s % 50,
            s,
        )


@dataclass
class Published:
    sent: int
    acked: int
    started_at: float
    elapsed_s: float
    acked_seqs: list[int]
    cpu_s: float = 0.0
    """CPU seconds of the publisher process (it has exited when its parent reads them)."""


async def publish_stamped(
    url: str, devices: list[str], messages: int, rate: float, seq_offset: int, timeout_s: float = 120.0
) -> Published:
    """Publish ``messages`` stamped readings at ``rate``/s (open loop: up to 60,000 unacknowledged)."""
    result = await publish_async(
        url,
        devices,
        messages,
        payload=StampedPayload(seq_offset),
        rate=rate,
        max_inflight=60_000,
        timeout_s=timeout_s,
    )
    seqs = [seq_offset + s for s in result.acked_seqs]
    return Published(result.sent, result.acked, result.started_at, result.elapsed_s, seqs)


def start_publisher(
    url: str, prefix: str, devices: int, messages: int, rate: float, seq_offset: int, out: Path
) -> subprocess.Popen[bytes]:
    """The publisher as its own process; its result lands in ``out`` (JSON) when it exits."""
    return subprocess.Popen(
        [
            *(sys.executable, __file__, "publish", "--url", url, "--prefix", prefix),
            *("--devices", str(devices), "--messages", str(messages), "--rate", str(rate)),
            *("--seq-offset", str(seq_offset), "--out", str(out)),
        ]
    )


def read_published(out: Path) -> Published:
    return Published(**json.loads(out.read_text()))


# -- WebSocket clients ----------------------------------------------------------------------------------


class _Frame(msgspec.Struct):
    type: str
    ts: datetime | None = None
    metrics: dict[str, Any] = {}


@dataclass
class Samples:
    """What the clients saw: receipt time (epoch s), delay (s) and seq of each telemetry frame."""

    received_at: array[float]
    delay: array[float]
    seq: array[int]

    @classmethod
    def empty(cls) -> Samples:
        return cls(array("d"), array("d"), array("q"))

    def extend(self, other: Samples) -> None:
        self.received_at.extend(other.received_at)
        self.delay.extend(other.delay)
        self.seq.extend(other.seq)


def client_process(url: str, groups: list[list[str]], commands: Any, results: Any) -> None:
    """Entry point of the client process (spawned): one connection per device group."""
    asyncio.run(_clients(url, groups, commands, results))


async def _clients(url: str, groups: list[list[str]], commands: Any, results: Any) -> None:
    import aiohttp

    decoder = msgspec.json.Decoder(_Frame)
    samples = Samples.empty()
    connects = [0]
    subscribed = [0]
    loop = asyncio.get_running_loop()

    async def client(session: aiohttp.ClientSession, devices: list[str]) -> None:
        """Connect, subscribe, read; on any loss of the connection, do it again (0.1 s backoff)."""
        while True:
            try:
                async with session.ws_connect(url, compress=0, max_msg_size=0, heartbeat=None) as ws:
                    await ws.send_str(json.dumps({"type": "subscribe", "id": 1, "devices": devices}))
                    connects[0] += 1
                    acked = False
                    async for msg in ws:
                        if msg.type is not aiohttp.WSMsgType.TEXT:
                            break
                        now = time.time()
                        frame = decoder.decode(msg.data)
                        if frame.type == "telemetry" and frame.ts is not None:
                            samples.received_at.append(now)
                            samples.delay.append(now - frame.ts.timestamp())
                            samples.seq.append(int(frame.metrics.get("seq", -1)))
                        elif frame.type == "ack" and not acked:
                            acked = True
                            subscribed[0] += 1
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.1)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(client(session, g)) for g in groups]
        # The clients' own GC pauses would be counted as the platform's delay: keep them out of the way.
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)
        while True:
            command = await loop.run_in_executor(None, commands.get)
            if command == "collect":
                results.put(
                    (
                        samples.received_at.tobytes(),
                        samples.delay.tobytes(),
                        samples.seq.tobytes(),
                        connects[0],
                        subscribed[0],
                    )
                )
                samples = Samples.empty()
            elif command == "status":
                results.put((b"", b"", b"", connects[0], subscribed[0]))
            else:
                break
        for task in tasks:
            task.cancel()
    results.put("stopped")


class ClientFleet:
    """WebSocket clients in one separate process: ``clients`` connections splitting ``devices``."""

    def __init__(self, realtime_port: int, devices: list[str], clients: int) -> None:
        ctx = mp.get_context("spawn")
        self.commands: Any = ctx.Queue()
        self.results: Any = ctx.Queue()
        token = user_token(SECRET, "bench-e2e", ttl_s=24 * 3600)
        url = f"http://127.0.0.1:{realtime_port}/ws?token={token}"
        groups = [devices[i::clients] for i in range(min(clients, len(devices)))]
        self.proc = ctx.Process(
            target=client_process, args=(url, groups, self.commands, self.results), daemon=True
        )
        self.groups = len(groups)
        self.connects = 0

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        """Start the process and wait until every client is subscribed."""
        self.proc.start()
        self.wait_subscribed(self.groups, timeout)

    def _ask(self, command: str) -> tuple[bytes, bytes, bytes, int, int]:
        self.commands.put(command)
        answer: tuple[bytes, bytes, bytes, int, int] = self.results.get(timeout=60)
        self.connects = answer[3]
        return answer

    def wait_subscribed(self, count: int, timeout: float) -> None:
        """Wait until ``count`` subscriptions were acknowledged in total since the start."""
        deadline = time.monotonic() + timeout
        while self._ask("status")[4] < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"WebSocket clients not subscribed within {timeout}s")
            time.sleep(0.05)

    def subscribed(self) -> int:
        return self._ask("status")[4]

    def collect(self) -> Samples:
        """Everything received since the last collect."""
        at, delay, seq, _, _ = self._ask("collect")
        samples = Samples.empty()
        samples.received_at.frombytes(at)
        samples.delay.frombytes(delay)
        samples.seq.frombytes(seq)
        return samples

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.commands.put("stop")
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


# -- private brokers ------------------------------------------------------------------------------------


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start on {port}")
        time.sleep(0.02)


class Broker:
    """A private Mosquitto on a fixed free port and data directory: restartable with its sessions.

    The configuration is the tests' (``max_queued_messages`` raised, never 0), plus persistence when
    ``persistent``: a SIGTERMed broker saves its sessions and queued messages and reloads them at start.
    """

    def __init__(self, persistent: bool = False) -> None:
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="bench-mosquitto-")
        folder = Path(self._dir.name)
        config = MOSQUITTO_TEST_CONFIG.replace("listener 1883", f"listener {self.port} 127.0.0.1")
        if persistent:
            config = config.replace("persistence false", "persistence true")
            config += f"persistence_location {folder}/\nautosave_interval 1\n"
        self.config = folder / "mosquitto.conf"
        self.config.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Broker:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_port(self.port, self.proc, "mosquitto")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


class RedisServer:
    """A private redis-server without persistence on a fixed free port; restartable."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> RedisServer:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_port(self.port, self.proc, "redis-server")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)


class TcpProxy:
    """A TCP forwarder (in the running event loop) that can be cut and restored: PostgreSQL "goes away"
    for the services behind it, every connection closed and new ones refused, while the server runs on."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


# -- accounting -----------------------------------------------------------------------------------------


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """User + system CPU seconds of each of these processes that still runs."""
    found = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            found[pid] = t.user + t.system
    return found


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two :func:`cpu_seconds` readings, by the processes in both: a process
    that exited in between (a PostgreSQL backend, say) must not count as negative time."""
    return sum(after[pid] - before[pid] for pid in after.keys() & before.keys())


def rss_mb(pid: int) -> float:
    with contextlib.suppress(psutil.Error):
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    return 0.0


def postgres_aux_pids() -> list[int]:
    """The server-wide PostgreSQL processes that work for every database (WAL writer, checkpointer...)."""
    names = ("walwriter", "checkpointer", "background writer")
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("postgres:") and any(n in cmd for n in names):
            pids.append(proc.pid)
    return pids


def system_redis_pid(port: int) -> int | None:
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "redis-server" and f":{port}" in " ".join(proc.info["cmdline"] or []):
            return int(proc.pid)
    return None


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# -- command line (the publisher process) ---------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="stamped open-loop QoS 1 publisher")
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish")
    pub.add_argument("--url", required=True)
    pub.add_argument("--prefix", required=True)
    pub.add_argument("--devices", type=int, required=True)
    pub.add_argument("--messages", type=int, required=True)
    pub.add_argument("--rate", type=float, required=True)
    pub.add_argument("--seq-offset", type=int, default=0)
    pub.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        result = asyncio.run(
            publish_stamped(
                args.url, device_ids(args.prefix, args.devices), args.messages, args.rate, args.seq_offset
            )
        )
    except OSError:
        result = Published(0, 0, time.time(), 0.0, [])
    result.cpu_s = time.process_time()
    args.out.write_text(json.dumps(result.__dict__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
