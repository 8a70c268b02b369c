"""A QoS 1 MQTT load generator that counts PUBACKs, and a bare counting subscriber.

Used by the benchmarks and the end-to-end tests. Message ``seq`` of a run goes to
device ``seq % len(devices)`` with ``ts = base_ms + seq``, so each (device, metric, ts) is unique and a
reading can be traced back to the message that carried it. Only what the broker acknowledged (PUBACK) is
reported as acknowledged, never what was merely written to the socket (``mosquitto_pub -l`` loses lines).

It speaks the few MQTT 3.1.1 packets it needs (CONNECT, PUBLISH QoS 1, PUBACK, SUBSCRIBE) over an asyncio
socket: paho-mqtt, measured first, tops out near 8,000 messages/s on this machine, below the rate the
ingest service is meant to sustain, so it would have measured itself.

Command line (prints one JSON object)::

    python -m iot_testkit.loadgen publish --url mqtt://127.0.0.1:1883 --devices 100 --messages 100000
    python -m iot_testkit.loadgen subscribe --url mqtt://127.0.0.1:1883 --topic 'devices/telemetry/+' \
        --count 100000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import struct
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from urllib.parse import unquote, urlsplit


@dataclass
class PublishResult:
    sent: int
    acked: int
    elapsed_s: float
    """From the first publish to the last PUBACK (or the end of the wait)."""
    started_at: float
    """``time.time()`` of the first publish, to measure end-to-end latency from."""
    acked_seqs: list[int] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.acked / self.elapsed_s if self.elapsed_s > 0 else 0.0


def telemetry_payload(seq: int, base_ms: int) -> bytes:
    """Three metrics; ``ts`` unique per message of a run."""
    return b'{"ts":%d,"metrics":{"temperature":%.1f,"humidity":%d,"seq":%d}}' % (
        base_ms + seq,
        20 + (seq % 100) / 10,
        30 + seq % 50,
        seq,
    )


def device_ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(count)]


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    data = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _remaining_length(len(body)) + body


class _Connection:
    """One MQTT 3.1.1 connection: reads packets, hands PUBACKs and PUBLISHes to callbacks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, url: str, client_id: str, clean: bool = True) -> _Connection:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(
            parts.hostname or "127.0.0.1",
            parts.port or (8883 if parts.scheme == "mqtts" else 1883),
            ssl=parts.scheme == "mqtts" or None,
            limit=1 << 20,
        )
        flags = 0x02 if clean else 0
        tail = _string(client_id)
        if parts.username:
            flags |= 0x80
            tail += _string(unquote(parts.username))
            if parts.password is not None:
                flags |= 0x40
                tail += _string(unquote(parts.password))
        writer.write(_packet(0x10, _string("MQTT") + bytes([4, flags]) + struct.pack("!H", 60) + tail))
        first, body = await cls._read(reader)
        if first >> 4 != 2 or body[1] != 0:
            writer.close()
            raise ConnectionError(f"CONNACK refused: {body!r}")
        return cls(reader, writer)

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> tuple[int, bytes]:
        first = (await reader.readexactly(1))[0]
        length, shift = 0, 0
        while True:
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first, await reader.readexactly(length) if length else b""

    async def read(self) -> tuple[int, bytes]:
        return await self._read(self.reader)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"\xe0\x00")
            self.writer.close()
            await self.writer.wait_closed()


async def publish_async(
    url: str,
    devices: Sequence[str],
    messages: int,
    *,
    base_ms: int | None = None,
    payload: Callable[[int, int], bytes] = telemetry_payload,
    max_inflight: int = 1000,
    rate: float = 0.0,
    timeout_s: float = 120.0,
    on_progress: Callable[[int], object] | None = None,
    topic_prefix: str = "devices/telemetry/",
    retain: bool = False,
) -> PublishResult:
    """Publish ``messages`` QoS 1 messages round-robin over ``devices``; wait for their PUBACKs.

    At most ``max_inflight`` are unacknowledged at once. ``rate`` (messages/s, 0 = as fast as the broker
    acknowledges) paces publishing; ``on_progress`` gets the number sent every 1000 messages (a test can
    kill a process mid-stream there); ``retain`` sets the RETAIN flag. If the connection drops, what was
    not acknowledged is not retried: the result says exactly which messages the broker took.
    """
    base = int(time.time() * 1000) - messages - 1000 if base_ms is None else base_ms
    conn = await _Connection.open(url, f"loadgen-{uuid.uuid4().hex[:12]}")
    window = asyncio.Semaphore(max_inflight)
    free_ids = list(range(min(max_inflight, 65535), 0, -1))
    in_flight: dict[int, int] = {}
    acked_seqs: list[int] = []
    all_acked = asyncio.Event()
    sent = 0
    topics = [_string(topic_prefix + d) for d in devices]

    async def read_acks() -> None:
        while True:
            first, body = await conn.read()
            if first >> 4 == 4:
                (pid,) = struct.unpack_from("!H", body)
                seq = in_flight.pop(pid, None)
                if seq is not None:
                    acked_seqs.append(seq)
                    free_ids.append(pid)
                    window.release()
                    if len(acked_seqs) == messages:
                        all_acked.set()

    reader = asyncio.create_task(read_acks())
    started, started_wall = time.perf_counter(), time.time()
    try:
        for seq in range(messages):
            if rate > 0:
                ahead = started + seq / rate - time.perf_counter()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if window.locked() or seq % 256 == 0:
                await conn.writer.drain()
            await asyncio.wait_for(window.acquire(), timeout_s)
            if reader.done():
                break
            pid = free_ids.pop()
            in_flight[pid] = seq
            body = topics[seq % len(topics)] + struct.pack("!H", pid) + payload(seq, base)
            conn.writer.write(_packet(0x33 if retain else 0x32, body))
            sent += 1
            if on_progress is not None and sent % 1000 == 0:
                on_progress(sent)
        await conn.writer.drain()
        # Wait for the last PUBACKs, but not for ever if the connection is gone (the broker went away).
        waiter = asyncio.ensure_future(all_acked.wait())
        await asyncio.wait({waiter, reader}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        pass
    finally:
        elapsed = time.perf_counter() - started
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
        await conn.close()
    return PublishResult(sent, len(acked_seqs), elapsed, started_wall, sorted(acked_seqs))


def publish(url: str, devices: Sequence[str], messages: int, **kwargs: object) -> PublishResult:
    """:func:`publish_async` for synchronous callers (tests, scripts)."""
    return asyncio.run(publish_async(url, devices, messages, **kwargs))  # type: ignore[arg-type]


@dataclass
class SubscribeResult:
    received: int
    first_at: float
    last_at: float


async def subscribe_count_async(
    url: str, topic: str, count: int, *, ready: Callable[[], None] | None = None, timeout_s: float = 120.0
) -> SubscribeResult:
    """A bare QoS 1 subscriber (no processing, PUBACK at once): counts messages until ``count``."""
    conn = await _Connection.open(url, f"bare-{uuid.uuid4().hex[:12]}")
    conn.writer.write(_packet(0x82, struct.pack("!H", 1) + _string(topic) + b"\x01"))
    first, _ = await conn.read()
    if first >> 4 != 9:
        raise ConnectionError("no SUBACK")
    if ready is not None:
        ready()
    received, first_at, last_at = 0, 0.0, 0.0
    deadline = time.monotonic() + timeout_s
    try:
        while received < count:
            first, body = await asyncio.wait_for(conn.read(), max(0.0, deadline - time.monotonic()))
            if first >> 4 != 3:
                continue
            last_at = time.time()
            if not received:
                first_at = last_at
            received += 1
            if (first >> 1) & 3:
                (tlen,) = struct.unpack_from("!H", body)
                conn.writer.write(b"\x40\x02" + body[2 + tlen : 4 + tlen])
    except TimeoutError:
        pass
    finally:
        await conn.close()
    return SubscribeResult(received, first_at, last_at)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="QoS 1 MQTT load generator counting PUBACKs")
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish")
    pub.add_argument("--url", default="mqtt://127.0.0.1:1883")
    pub.add_argument("--devices", type=int, default=100)
    pub.add_argument("--prefix", default=f"lg{uuid.uuid4().hex[:6]}")
    pub.add_argument("--messages", type=int, default=10000)
    pub.add_argument("--rate", type=float, default=0.0)
    pub.add_argument("--max-inflight", type=int, default=1000)
    pub.add_argument("--base-ms", type=int, default=None)
    cnt = sub.add_parser("subscribe")
    cnt.add_argument("--url", default="mqtt://127.0.0.1:1883")
    cnt.add_argument("--topic", default="devices/telemetry/+")
    cnt.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "publish":
        result = publish(
            args.url,
            device_ids(args.prefix, args.devices),
            args.messages,
            base_ms=args.base_ms,
            rate=args.rate,
            max_inflight=args.max_inflight,
        )
        summary = {k: v for k, v in asdict(result).items() if k != "acked_seqs"}
        print(json.dumps({**summary, "rate": round(result.rate, 1)}), flush=True)
        return 0 if result.acked == result.sent else 1
    res = asyncio.run(
        subscribe_count_async(
            args.url, args.topic, args.count, ready=lambda: print('{"ready": true}', flush=True)
        )
    )
    print(json.dumps(asdict(res)), flush=True)
    return 0 if res.received >= args.count else 1


if __name__ == "__main__":
    sys.exit(main())
