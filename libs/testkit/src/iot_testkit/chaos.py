"""Faults under load, for ``make chaos`` (bench/chaos.py) and its smallest version in the tests
(tests/e2e/test_chaos.py): the platform with handles to break each part, and the checks after each fault.

A private Mosquitto (persistence on a data directory, so the ingest session and its queued messages survive
a broker restart), a private redis-server, a database reached by ``iot-ingest`` through a TCP proxy that
can be cut, ``iot-ingest`` and ``iot-realtime`` as processes, a publisher process at a moderate rate and
WebSocket clients in another process (reconnecting when the gateway goes away).

Each scenario publishes for a while, injects one fault, undoes it, and then checks:

- storage: every reading the broker acknowledged (PUBACK) to the publisher is stored, exactly once (its
  ``seq`` once, and 3 rows per (device, ts));
- WebSocket: the clients receive readings published after the fault again ("resumed": from the repair to
  the first such reading; None when none arrived), and readings stored late reach them ("caught up": from
  the repair until the last reading published before the repair arrived). The clients resume with
  ``since`` when the gateway goes away, so a killed gateway costs them nothing; readings published while
  Redis was down are not replayed to clients whose connection stayed open (pub/sub has no history):
  "WS missed". "WS twice": readings a client received more than once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from iot_testkit.fleet import ClientFleet, Samples
from iot_testkit.processes import Broker, RedisServer, ServiceProcess, Start, free_port
from iot_testkit.publisher import read_published, start_publisher
from iot_testkit.waiting import WaitTimeout, wait_for


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
    resumed_s: float | None
    """From the repair to the first reading published after it on the WebSocket; None if none came."""
    caught_up_s: float
    ws_missed: int
    ws_received: int
    ws_duplicated: int = 0
    """Readings the WebSocket clients received more than once (resuming must not repeat any)."""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.duplicated == 0 and self.resumed_s is not None


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
        self.mqtt_url = self.broker.url
        self.publisher_host: list[str] = []
        """Prefix of the publisher's command: the host it runs on (:mod:`iot_testkit.netbed`)."""

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
            proc = start_publisher(
                self.mqtt_url, self.prefix, len(self.devices), messages, rate, lo, out, self.publisher_host
            )
            await asyncio.to_thread(proc.wait, seconds + 120)
            result = read_published(out)
            acked.update(result.acked_seqs)
            sent.update(range(lo, lo + result.sent))
            if result.acked < messages:
                await asyncio.sleep(0.2)
        return acked, sent

    async def stored(self, lo: int, hi: int) -> tuple[dict[int, int], int]:
        """(seq -> rows of the ``seq`` metric stored, for ``lo <= seq < hi``; readings of the whole run not
        stored as exactly 3 rows)."""
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
            return {int(r["seq"]): int(r["n"]) for r in rows}, int(bad)
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
        after_repair_s: float = 2.0,
    ) -> Outcome:
        """Publish for ``phase_s`` s, inject ``fault`` after ``fault_at_s`` s, publish ``after_repair_s`` s
        more once both are over (so that readings are published after the repair however long it took, or
        held up the first publisher), then check everything."""
        assert self.fleet is not None
        lo = self.seq
        publishing = asyncio.create_task(self.publish_for(phase_s, rate))
        await asyncio.sleep(fault_at_s)
        broken = time.time()
        repaired = await fault()
        acked, sent = await publishing
        more_acked, more_sent = await self.publish_for(after_repair_s, rate)
        acked |= more_acked
        sent |= more_sent
        hi = self.seq
        stored: dict[int, int] = {}
        bad = 0

        async def all_stored() -> bool:
            nonlocal stored, bad
            stored, bad = await self.stored(lo, hi)
            return acked <= stored.keys() or bad > 0

        # What is still missing after the wait is counted below, not raised.
        with contextlib.suppress(WaitTimeout):
            await wait_for(all_stored, 120, "every acknowledged reading stored", interval=0.5)
        # Every stored reading should reach the clients (except what the fault's design loses): wait for it.
        got = Samples.empty()

        async def all_received() -> bool:
            assert self.fleet is not None
            got.extend(await asyncio.to_thread(self.fleet.collect))
            return {s for s in got.seq if lo <= s < hi} >= stored.keys()

        with contextlib.suppress(WaitTimeout):
            await wait_for(all_received, 5 if ws_lossy else 30, "every stored reading on the WebSocket")
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
            duplicated=sum(1 for n in stored.values() if n != 1) + bad,
            extra=len(stored.keys() - acked),
            outage_s=repaired - broken,
            resumed_s=(min(fresh) - repaired) if fresh else None,
            caught_up_s=(max(before) - repaired) if before else float("nan"),
            ws_missed=len(stored.keys() - {s for _, _, s in mine}),
            ws_received=len({s for _, _, s in mine}),
            ws_duplicated=len(mine) - len({s for _, _, s in mine}),
        )
        if len(sent) > len(acked):
            outcome.notes.append(f"{len(sent) - len(acked)} sent without PUBACK")
        print(format_outcome(outcome), flush=True)
        return outcome


HEADER = (
    "| fault | acked | stored once | missing | duplicated | stored, not acked | outage s | WS resumed s "
    "| WS caught up s | WS missed | WS twice |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def format_outcome(o: Outcome) -> str:
    resumed = "never" if o.resumed_s is None else f"{o.resumed_s:.2f}"
    return (
        f"| {o.fault} | {o.acked:,} | {o.stored_once:,} | {o.missing} | {o.duplicated} | {o.extra} "
        f"| {o.outage_s:.1f} | {resumed} | {o.caught_up_s:.2f} | {o.ws_missed} | {o.ws_duplicated} |"
    )
