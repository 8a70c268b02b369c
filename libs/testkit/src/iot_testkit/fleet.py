"""WebSocket clients of ``iot-realtime`` in a separate process, for the end-to-end benchmark and the chaos
script and test: one connection per group of devices, reconnecting and resubscribing when the gateway
goes away (with each device's ``since``, the ``ts`` of the last reading seen of it: gap-free resume),
recording (receipt time, delay, seq) of each reading (``StampedPayload`` of :mod:`iot_testkit.publisher`).
Their tokens are signed with ``JWT_SECRET`` of :mod:`iot_testkit.processes`, the secret of every service its
``ServiceProcess`` starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import time
from array import array
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from iot_testkit.processes import JWT_SECRET
from iot_testkit.tokens import user_token
from iot_testkit.waiting import wait_until


class _Frame(msgspec.Struct):
    type: str
    device_id: str | None = None
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


def client_process(
    url: str, groups: list[list[str]], commands: Any, results: Any, netns: str | None = None
) -> None:
    """Entry point of the client process (spawned): one connection per device group; in the network
    namespace ``netns`` (a host of :mod:`iot_testkit.netbed`) if given."""
    if netns is not None:
        from iot_testkit.netbed import enter

        enter(netns)
    asyncio.run(_clients(url, groups, commands, results))


async def _clients(url: str, groups: list[list[str]], commands: Any, results: Any) -> None:
    import aiohttp

    decoder = msgspec.json.Decoder(_Frame)
    samples = Samples.empty()
    connects = [0]
    subscribed = [0]
    loop = asyncio.get_running_loop()

    async def client(session: aiohttp.ClientSession, devices: list[str]) -> None:
        """Connect, subscribe, read; on any loss of the connection, do it again (0.1 s backoff), resuming
        each device after the last reading seen of it (one subscribe frame per device: ``since`` applies to
        every device of its frame)."""
        last: dict[str, datetime] = {}
        started: datetime | None = None
        while True:
            try:
                async with session.ws_connect(url, compress=0, max_msg_size=0, heartbeat=None) as ws:
                    if started is None:
                        await ws.send_str(json.dumps({"type": "subscribe", "id": 1, "devices": devices}))
                        expected = 1
                    else:
                        for device_id in devices:
                            since = last.get(device_id, started).isoformat()
                            request = {"type": "subscribe", "id": 1, "devices": [device_id], "since": since}
                            await ws.send_str(json.dumps(request))
                        expected = len(devices)
                    connects[0] += 1
                    acks = 0
                    async for msg in ws:
                        if msg.type is not aiohttp.WSMsgType.TEXT:
                            break
                        now = time.time()
                        frame = decoder.decode(msg.data)
                        if frame.type == "telemetry" and frame.ts is not None:
                            samples.received_at.append(now)
                            samples.delay.append(now - frame.ts.timestamp())
                            samples.seq.append(int(frame.metrics.get("seq", -1)))
                            if frame.device_id is not None:
                                seen = last.get(frame.device_id)
                                if seen is None or frame.ts > seen:
                                    last[frame.device_id] = frame.ts
                        elif frame.type == "ack" and acks < expected:
                            acks += 1
                            if acks == expected:
                                subscribed[0] += 1
                                if started is None:
                                    started = datetime.now(UTC)
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

    def __init__(
        self,
        realtime_port: int,
        devices: list[str],
        clients: int,
        *,
        host: str = "127.0.0.1",
        netns: str | None = None,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.commands: Any = ctx.Queue()
        self.results: Any = ctx.Queue()
        token = user_token(JWT_SECRET, "bench-e2e", ttl_s=24 * 3600)
        url = f"http://{host}:{realtime_port}/ws?token={token}"
        groups = [devices[i::clients] for i in range(min(clients, len(devices)))]
        self.proc = ctx.Process(
            target=client_process, args=(url, groups, self.commands, self.results, netns), daemon=True
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
        wait_until(lambda: self.subscribed() >= count, timeout, f"{count} WebSocket subscriptions")

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
