"""An open-loop QoS 1 publisher of stamped readings, run as its own process by the end-to-end benchmark,
the chaos script and the chaos test.

:class:`StampedPayload`: telemetry whose ``ts`` is the time the message was *scheduled* to be published
(microseconds, as fractional epoch milliseconds, strictly increasing within a publisher) and whose ``seq``
metric names the message, so a WebSocket client can time publish -> receipt and anyone can match stored
rows to PUBACKed messages.
:func:`start_publisher` runs ``python -m iot_testkit.publisher publish ...`` (the PUBACK-counting client of
:mod:`iot_testkit.loadgen`, paced at a fixed rate), which writes the acknowledged sequence numbers to a file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from iot_testkit.loadgen import device_ids, publish_async


class StampedPayload:
    """Three metrics, ``ts`` in microseconds (unique: bumped by 1 us on a tie).

    With a ``rate``, ``ts`` is the time message ``seq`` was scheduled to go out (the first message's
    publish time + ``seq / rate``), not the time it was written: a publisher held up (by its own CPU, or
    the socket) would otherwise stamp the delay away and hide it from the measured tail (coordinated
    omission). Without a rate, the time it is written.
    """

    def __init__(self, seq_offset: int = 0, rate: float = 0.0) -> None:
        self.offset = seq_offset
        self.rate = rate
        self.start_us = 0
        self.last_us = 0

    def __call__(self, seq: int, _base: int) -> bytes:
        now = time.time_ns() // 1000
        if self.rate > 0:
            if not self.start_us:
                self.start_us = now - int(seq * 1e6 / self.rate)
            us = self.start_us + int(seq * 1e6 / self.rate)
        else:
            us = now
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
        payload=StampedPayload(seq_offset, rate),
        rate=rate,
        max_inflight=60_000,
        timeout_s=timeout_s,
    )
    seqs = [seq_offset + s for s in result.acked_seqs]
    return Published(result.sent, result.acked, result.started_at, result.elapsed_s, seqs)


def start_publisher(
    url: str,
    prefix: str,
    devices: int,
    messages: int,
    rate: float,
    seq_offset: int,
    out: Path,
    on_host: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """The publisher as its own process; its result lands in ``out`` (JSON) when it exits. ``on_host``
    prefixes the command (``ip netns exec NS`` for a host of :mod:`iot_testkit.netbed`)."""
    return subprocess.Popen(
        [
            *on_host,
            *(sys.executable, "-m", "iot_testkit.publisher", "publish", "--url", url, "--prefix", prefix),
            *("--devices", str(devices), "--messages", str(messages), "--rate", str(rate)),
            *("--seq-offset", str(seq_offset), "--out", str(out)),
        ]
    )


def read_published(out: Path) -> Published:
    return Published(**json.loads(out.read_text()))


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
