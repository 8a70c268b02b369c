"""``iot-sim``: N devices publishing M metrics at R Hz over MQTT, counting the broker's PUBACKs.

    iot-sim --devices 10 --metrics 3 --rate 1
    iot-sim --devices 5 --api-url http://127.0.0.1:8000 --api-key iotk_... --will
    iot-sim --credentials devices.csv

The broker URL comes from ``--mqtt-url`` or ``IOT_MQTT_URL``. With ``--api-key`` the devices are
registered through the API first, and each connects with the MQTT credentials the API returned (a device
that already existed gets its credentials rotated). With ``--credentials FILE`` (lines
``device_id,username,password``) the devices are those of the file, each with its credentials. With
per-device credentials or ``--will`` each device has its own connection; ``--will`` also announces
``online`` on ``devices/status/{id}`` and leaves ``offline`` as its will message. Otherwise one connection,
as the user of ``--mqtt-url``, publishes for every device.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import httpx
import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from tqdm import tqdm

from iot_common.topics import status_topic, telemetry_topic
from iot_sim.model import fleet


@dataclass
class Stats:
    published: int = 0
    acked: int = 0
    failed: int = 0


class AckCounter:
    """Counts PUBACKs across every connection (paho calls back from its network threads)."""

    def __init__(self) -> None:
        self.stats = Stats()
        self._lock = threading.Lock()

    def on_publish(self, _c: object, _u: object, _mid: int, reason: object, _p: object) -> None:
        with self._lock:
            if getattr(reason, "is_failure", False):
                self.stats.failed += 1
            else:
                self.stats.acked += 1

    def published(self) -> None:
        with self._lock:
            self.stats.published += 1


Credentials = dict[str, tuple[str, str]]
"""device id -> (MQTT username, password)"""


def _client(
    url: str,
    client_id: str,
    counter: AckCounter,
    will_topic: str | None,
    login: tuple[str, str] | None = None,
) -> mqtt.Client:
    """A connected client; ``login`` (a device's own credentials) replaces the user of ``url``."""
    parts = urlsplit(url)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, reconnect_on_failure=True
    )
    if login is not None:
        client.username_pw_set(*login)
    elif parts.username:
        client.username_pw_set(unquote(parts.username), unquote(parts.password or ""))
    if parts.scheme == "mqtts":
        client.tls_set()
    if will_topic:
        client.will_set(will_topic, b"offline", qos=1, retain=True)
    client.on_publish = counter.on_publish
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=30)
    client.loop_start()
    return client


def register_devices(api_url: str, api_key: str, device_ids: list[str]) -> Credentials:
    """Create the devices through the API and return their MQTT credentials; a device that already
    exists (409) gets new ones (``POST /api/v1/devices/{id}/credentials``)."""
    found: Credentials = {}
    with httpx.Client(base_url=api_url, headers={"X-API-Key": api_key}, timeout=10) as http:
        for device_id in device_ids:
            response = http.post(
                "/api/v1/devices", json={"id": device_id, "name": device_id, "type": "simulated"}
            )
            if response.status_code == 409:
                response = http.post(f"/api/v1/devices/{device_id}/credentials")
            if response.status_code not in (200, 201):
                raise SystemExit(
                    f"iot-sim: registering {device_id} failed: {response.status_code} {response.text}"
                )
            mqtt_login = response.json().get("mqtt", response.json())
            found[device_id] = (mqtt_login["username"], mqtt_login["password"])
    return found


def read_credentials(path: str) -> Credentials:
    """``device_id,username,password`` lines (blank lines and ``#`` comments skipped)."""
    found: Credentials = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(",", 2)
            if len(parts) != 3 or not all(parts):
                raise SystemExit(f"iot-sim: {path}:{number}: expected device_id,username,password")
            found[parts[0]] = (parts[1], parts[2])
    if not found:
        raise SystemExit(f"iot-sim: {path} holds no credentials")
    return found


def run(args: argparse.Namespace, stop: threading.Event) -> Stats:
    device_ids = [f"{args.prefix}-{i:04d}" for i in range(args.devices)]
    logins: Credentials = {}
    if args.credentials:
        logins = read_credentials(args.credentials)
        device_ids = list(logins)
    if args.api_key:
        logins = register_devices(args.api_url, args.api_key, device_ids)
    counter = AckCounter()
    models = fleet(len(device_ids), args.metrics, args.seed, args.spike_probability)
    if args.will or logins:
        clients = [
            _client(args.mqtt_url, f"sim-{d}", counter, status_topic(d) if args.will else None, logins.get(d))
            for d in device_ids
        ]
        if args.will:
            for client, device_id in zip(clients, device_ids, strict=True):
                client.publish(status_topic(device_id), b"online", qos=1, retain=True)
                counter.published()
    else:
        shared = _client(args.mqtt_url, f"sim-{args.prefix}-{os.getpid()}", counter, None)
        clients = [shared] * len(device_ids)
    encoder = msgspec.json.Encoder()
    interval = 1.0 / args.rate
    started = time.monotonic()
    deadline = started + args.duration if args.duration else float("inf")
    progress = tqdm(unit="msg", desc="published", disable=args.quiet, mininterval=1.0)
    tick = 0
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            now_ms = int(time.time() * 1000)
            for client, device_id, model in zip(clients, device_ids, models, strict=True):
                payload = encoder.encode({"ts": now_ms, "metrics": model.sample()})
                client.publish(telemetry_topic(device_id), payload, qos=1)
                counter.published()
            progress.update(len(device_ids))
            progress.set_postfix(acked=counter.stats.acked, failed=counter.stats.failed, refresh=False)
            tick += 1
            # Open loop: the schedule is fixed, a slow broker does not slow the offered rate.
            stop.wait(max(0.0, started + tick * interval - time.monotonic()))
        _wait_for_acks(counter, timeout=10.0)
    finally:
        progress.close()
        for client in dict.fromkeys(clients):
            client.disconnect()
            client.loop_stop()
    return counter.stats


def _wait_for_acks(counter: AckCounter, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if counter.stats.acked + counter.stats.failed >= counter.stats.published:
            return
        time.sleep(0.05)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="iot-sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10, help="number of devices (default 10)")
    parser.add_argument("--metrics", type=int, default=3, help="metrics per message (default 3)")
    parser.add_argument("--rate", type=float, default=1.0, help="messages per second per device (default 1)")
    parser.add_argument("--duration", type=float, default=0, help="seconds to run; 0 runs until Ctrl-C")
    parser.add_argument("--prefix", default="sim", help="device ids are PREFIX-0000, PREFIX-0001...")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--spike-probability",
        type=float,
        default=0.002,
        help="chance per value of a threshold-crossing spike",
    )
    parser.add_argument("--mqtt-url", default=os.environ.get("IOT_MQTT_URL", "mqtt://127.0.0.1:1883"))
    parser.add_argument("--api-url", default=os.environ.get("IOT_SIM_API_URL", "http://127.0.0.1:8000"))
    parser.add_argument(
        "--api-key", default=os.environ.get("IOT_SIM_API_KEY", ""), help="register devices first"
    )
    parser.add_argument(
        "--credentials",
        default=os.environ.get("IOT_SIM_CREDENTIALS", ""),
        metavar="FILE",
        help="device_id,username,password lines: simulate these devices with their own MQTT credentials",
    )
    parser.add_argument("--will", action="store_true", help="one connection per device with an offline will")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.metrics < 1 or args.rate <= 0:
        parser.error("--devices and --metrics must be at least 1 and --rate above 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stats = run(args, stop)
    print(
        f"iot-sim: published {stats.published}, acknowledged {stats.acked}, failed {stats.failed}",
        file=sys.stderr,
    )
    if stats.acked < stats.published:
        raise SystemExit(1)
