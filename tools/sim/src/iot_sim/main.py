"""``iot-sim``: N devices publishing M metrics at R Hz over MQTT, counting the broker's PUBACKs.

    iot-sim --devices 10 --metrics 3 --rate 1
    iot-sim --devices 5 --api-url http://127.0.0.1:8000 --api-key iotk_... --will
    iot-sim --devices 10000 --api-key iotk_... --register
    iot-sim --credentials devices.csv
    iot-sim --api-key iotk_... --seed-demo-rule --spike-probability 0.01

The broker URL comes from ``--mqtt-url`` or ``IOT_MQTT_URL``. With ``--api-key`` the devices are
registered through the API first, and each connects with the MQTT credentials the API returned (a device
that already existed gets its credentials rotated); ``--register`` does it in one request for the whole
fleet (``POST /api/v1/devices/import``). With ``--credentials FILE`` (lines
``device_id,username,password``) the devices are those of the file, each with its credentials. With
per-device credentials or ``--will`` each device has its own connection; ``--will`` also announces
``online`` on ``devices/status/{id}`` once subscribed to its commands (after every connection, so the
commands queued while it was away reach it) and leaves ``offline`` as its will message. Otherwise one
connection, as the user of ``--mqtt-url``, publishes for every device.

Every device answers the commands it receives on ``devices/commands/{id}`` (``ping``, ``reboot``,
``set_interval``; :mod:`iot_sim.commands`) on ``devices/commands/{id}/ack``. ``--seed-demo-rule`` (with
``--api-key``) first creates the demo alert rule that the temperature spikes trip (:mod:`iot_sim.demo`).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from tqdm import tqdm

from iot_common.topics import (
    COMMAND_PREFIX,
    STATE_DESIRED_SUFFIX,
    STATE_PREFIX,
    command_ack_topic,
    command_topic,
    device_id_from_topic,
    state_desired_topic,
    state_reported_topic,
    status_topic,
    telemetry_topic,
)
from iot_sim.commands import SimulatedDevice, answer, encode_ack
from iot_sim.demo import DEMO_RULE_NAME, DEVICE_TYPE, ApiRefused, seed_demo_rule
from iot_sim.model import UNITS, fleet, metric_specs
from iot_sim.state import apply_desired, encode_report


@dataclass
class Stats:
    published: int = 0
    acked: int = 0
    failed: int = 0
    commands: int = 0
    """Commands answered."""


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

    def answered(self) -> None:
        with self._lock:
            self.stats.commands += 1


Credentials = dict[str, tuple[str, str]]
"""device id -> (MQTT username, password)"""


def _client(
    url: str,
    client_id: str,
    counter: AckCounter,
    will_topic: str | None,
    login: tuple[str, str] | None = None,
    command_topics: list[str] | None = None,
    on_command: Callable[[mqtt.Client, str, bytes], None] | None = None,
) -> tuple[mqtt.Client, threading.Event]:
    """A connected client and an event set once it is subscribed to ``command_topics`` (again after each
    reconnection); ``login`` (a device's own credentials) replaces the user of ``url``."""
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
    subscribed = threading.Event()
    topics = command_topics or []

    def on_connect(c: mqtt.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        if not reason.is_failure and topics:
            c.subscribe([(topic, 1) for topic in topics])

    def on_subscribe(c: mqtt.Client, _u: object, _mid: int, reasons: list[Any], _p: object) -> None:
        refused = [t for t, r in zip(topics, reasons, strict=False) if r.is_failure]
        if refused:
            _say(
                f"the broker refused the subscription to {', '.join(refused[:3])}: no command answered there"
            )
        if will_topic:
            # Online only once subscribed (after every connection): the commands queued while the device
            # was offline are published as soon as the platform sees this, and must find the subscription.
            c.publish(will_topic, b"online", qos=1, retain=True)
            counter.published()
        subscribed.set()

    def on_message(c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        if on_command is not None:
            on_command(c, message.topic, bytes(message.payload))

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.on_publish = counter.on_publish
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=30)
    client.loop_start()
    if not topics:
        subscribed.set()
    return client, subscribed


def _say(line: str) -> None:
    """A line on stderr that does not break the progress bar."""
    tqdm.write(f"iot-sim: {line}", file=sys.stderr)


def register_devices(api_url: str, api_key: str, device_ids: list[str], metrics: int = 3) -> Credentials:
    """Create the devices through the API (with the units of their metrics in ``attributes.units``) and
    return their MQTT credentials; a device that already exists (409) gets new ones
    (``POST /api/v1/devices/{id}/credentials``)."""
    found: Credentials = {}
    units = {spec.name: UNITS[spec.name] for spec in metric_specs(metrics) if spec.name in UNITS}
    with httpx.Client(base_url=api_url, headers={"X-API-Key": api_key}, timeout=10) as http:
        for device_id in device_ids:
            body = {"id": device_id, "name": device_id, "type": DEVICE_TYPE, "attributes": {"units": units}}
            response = http.post("/api/v1/devices", json=body)
            if response.status_code == 409:
                response = http.post(f"/api/v1/devices/{device_id}/credentials")
            if response.status_code not in (200, 201):
                raise SystemExit(
                    f"iot-sim: registering {device_id} failed: {response.status_code} {response.text}"
                )
            mqtt_login = response.json().get("mqtt", response.json())
            found[device_id] = (mqtt_login["username"], mqtt_login["password"])
    return found


def import_devices(api_url: str, api_key: str, device_ids: list[str]) -> Credentials:
    """Register the fleet in one request (``POST /api/v1/devices/import?credentials=true``) and return the
    MQTT credentials of the answer's CSV. The import is all or nothing: when some ids exist already, the
    others are imported and the existing ones get new credentials
    (``POST /api/v1/devices/{id}/credentials``)."""
    found: Credentials = {}
    with httpx.Client(base_url=api_url, headers={"X-API-Key": api_key}, timeout=600) as http:
        todo = list(device_ids)
        while todo:  # each refusal names up to 1,000 existing ids: those are rotated, the rest sent again
            body = "id,name,type\n" + "".join(f"{d},{d},{DEVICE_TYPE}\n" for d in todo)
            response = http.post(
                "/api/v1/devices/import?credentials=true",
                content=body.encode(),
                headers={"Content-Type": "text/csv"},
            )
            if response.status_code == 201:
                for row in csv.DictReader(io.StringIO(response.text)):
                    found[row["id"]] = (row["username"], row["password"])
                break
            rows = response.json().get("rows") if response.status_code == 422 else None
            existing = {r.get("id") for r in rows or [] if r.get("reason") == "already exists"}
            if not rows or len(existing) != len(rows):
                raise SystemExit(
                    f"iot-sim: importing the devices failed: {response.status_code} {response.text}"
                )
            for device_id in sorted(existing):
                rotated = http.post(f"/api/v1/devices/{device_id}/credentials")
                if rotated.status_code != 201:
                    raise SystemExit(
                        f"iot-sim: new credentials for {device_id} failed:"
                        f" {rotated.status_code} {rotated.text}"
                    )
                found[device_id] = (rotated.json()["username"], rotated.json()["password"])
            todo = [d for d in todo if d not in existing]
    _say(f"registered {len(device_ids)} devices through the import endpoint")
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


class Simulator:
    """The fleet of one ``iot-sim`` run: devices publish on their own schedules and answer commands.

    :meth:`run` loops in the calling thread; commands arrive on paho's network threads. :meth:`stop` may
    be called from a signal handler.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.counter = AckCounter()
        self.devices: dict[str, SimulatedDevice] = {}
        self._lock = threading.Lock()
        """Guards the devices' schedules and models, changed by commands."""
        self._stopping = threading.Event()
        self._wake = threading.Event()
        """Set by :meth:`stop` and by a command that changes a schedule."""

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def run(self) -> Stats:
        args = self.args
        device_ids = [f"{args.prefix}-{i:04d}" for i in range(args.devices)]
        logins: Credentials = {}
        if args.credentials:
            logins = read_credentials(args.credentials)
            device_ids = list(logins)
        if args.api_key and args.register:
            logins = import_devices(args.api_url, args.api_key, device_ids)
        elif args.api_key:
            logins = register_devices(args.api_url, args.api_key, device_ids, args.metrics)
        if args.seed_demo_rule:
            try:
                rule_id, created = seed_demo_rule(args.api_url, args.api_key)
            except (ApiRefused, httpx.HTTPError) as exc:
                raise SystemExit(f"iot-sim: creating the demo alert rule failed: {exc}") from None
            _say(f"demo alert rule {DEMO_RULE_NAME!r} {'created' if created else 'exists'} ({rule_id})")
        started = time.monotonic()
        models = fleet(len(device_ids), args.metrics, args.seed, args.spike_probability)
        for device_id, model in zip(device_ids, models, strict=True):
            self.devices[device_id] = SimulatedDevice(device_id, model, 1.0 / args.rate, started, started)
        clients = self._connect(device_ids, logins)
        try:
            self._publish_until_stopped(clients)
            _wait_for_acks(self.counter, timeout=10.0)
        finally:
            for client in dict.fromkeys(clients.values()):
                client.disconnect()
                client.loop_stop()
        return self.counter.stats

    def _connect(self, device_ids: list[str], logins: Credentials) -> dict[str, mqtt.Client]:
        """A client per device (per-device credentials or ``--will``), else one for all; each subscribed
        to its devices' command topics before the first reading."""
        args, counter = self.args, self.counter
        clients: dict[str, mqtt.Client] = {}
        waits: list[threading.Event] = []
        if args.will or logins:
            for d in device_ids:
                will = status_topic(d) if args.will else None
                client, subscribed = _client(
                    args.mqtt_url,
                    f"sim-{d}",
                    counter,
                    will,
                    logins.get(d),
                    [command_topic(d), state_desired_topic(d)],
                    self._on_message,
                )
                clients[d] = client
                waits.append(subscribed)
        else:
            topics = [command_topic(d) for d in device_ids] + [state_desired_topic(d) for d in device_ids]
            shared, subscribed = _client(
                args.mqtt_url,
                f"sim-{args.prefix}-{os.getpid()}",
                counter,
                None,
                None,
                topics,
                self._on_message,
            )
            clients = dict.fromkeys(device_ids, shared)
            waits.append(subscribed)
        deadline = time.monotonic() + 10.0
        if not all(w.wait(max(0.0, deadline - time.monotonic())) for w in waits):
            _say("not subscribed to every command topic within 10 s (broker down?); publishing anyway")
        return clients

    def _publish_until_stopped(self, clients: dict[str, mqtt.Client]) -> None:
        args = self.args
        encoder = msgspec.json.Encoder()
        deadline = time.monotonic() + args.duration if args.duration else float("inf")
        progress = tqdm(unit="msg", desc="published", disable=args.quiet, mininterval=1.0)
        try:
            while not self._stopping.is_set() and time.monotonic() < deadline:
                now, now_ms = time.monotonic(), int(time.time() * 1000)
                batch: list[tuple[str, bytes]] = []
                with self._lock:
                    for device in self.devices.values():
                        if device.next_due <= now:
                            payload = encoder.encode({"ts": now_ms, "metrics": device.model.sample()})
                            batch.append((device.device_id, payload))
                            # Open loop: the schedule is fixed, a slow broker does not slow the offered rate.
                            device.next_due += device.interval_s
                    next_due = min(d.next_due for d in self.devices.values())
                for device_id, payload in batch:
                    clients[device_id].publish(telemetry_topic(device_id), payload, qos=1)
                    self.counter.published()
                if batch:
                    progress.update(len(batch))
                    stats = self.counter.stats
                    progress.set_postfix(acked=stats.acked, failed=stats.failed, refresh=False)
                self._wake.wait(max(0.0, min(next_due, deadline) - time.monotonic()))
                self._wake.clear()
        finally:
            progress.close()

    def _on_message(self, client: mqtt.Client, topic: str, payload: bytes) -> None:
        if topic.startswith(STATE_PREFIX):
            self._on_desired(client, topic, payload)
        else:
            self._on_command(client, topic, payload)

    def _on_desired(self, client: mqtt.Client, topic: str, payload: bytes) -> None:
        """Apply a desired state and report it (on a paho network thread)."""
        device_id = device_id_from_topic(topic, STATE_PREFIX, STATE_DESIRED_SUFFIX)
        device = self.devices.get(device_id or "")
        if device is None:
            return
        try:
            with self._lock:
                report = apply_desired(device, payload)
        except Exception as exc:  # a bug here must not stop the device's client
            _say(f"{topic}: desired state not handled: {exc!r}")
            return
        if report is None:
            return
        client.publish(state_reported_topic(device.device_id), encode_report(report), qos=1)
        self.counter.published()
        _say(f"{device.device_id}: desired state version {report.version} applied: {report.reported}")

    def _on_command(self, client: mqtt.Client, topic: str, payload: bytes) -> None:
        """Answer a command (on a paho network thread; an exception there would stop that client)."""
        device_id = device_id_from_topic(topic, COMMAND_PREFIX)
        device = self.devices.get(device_id or "")
        if device is None:
            return
        try:
            with self._lock:
                interval = device.interval_s
                ack = answer(device, payload, time.monotonic())
                rescheduled = device.interval_s != interval
        except Exception as exc:  # a bug here must not stop the device's client
            _say(f"{topic}: command not handled: {exc!r}")
            return
        if ack is None:
            _say(f"{topic}: ignored a payload that is not a command ({len(payload)} bytes)")
            return
        if rescheduled:
            self._wake.set()
        client.publish(command_ack_topic(device.device_id), encode_ack(ack), qos=1)
        self.counter.published()
        self.counter.answered()
        outcome = "acked" if ack.status == "ok" else f"failed: {ack.error}"
        _say(f"{device.device_id}: command {ack.id} {outcome}")


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
        help="chance per value of a threshold-crossing spike (0-1, default 0.002)",
    )
    parser.add_argument(
        "--seed-demo-rule",
        action="store_true",
        help=f"with --api-key: first create the alert rule {DEMO_RULE_NAME!r} unless it exists",
    )
    parser.add_argument("--mqtt-url", default=os.environ.get("IOT_MQTT_URL", "mqtt://127.0.0.1:1883"))
    parser.add_argument("--api-url", default=os.environ.get("IOT_SIM_API_URL", "http://127.0.0.1:8000"))
    parser.add_argument(
        "--api-key", default=os.environ.get("IOT_SIM_API_KEY", ""), help="register devices first"
    )
    parser.add_argument(
        "--register",
        action="store_true",
        help="with --api-key: register the whole fleet in one request (POST /api/v1/devices/import)",
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
    if not 0 <= args.spike_probability <= 1:
        parser.error("--spike-probability must be from 0 to 1")
    if args.register and not args.api_key:
        parser.error("--register needs --api-key (or IOT_SIM_API_KEY)")
    if args.seed_demo_rule and not args.api_key:
        parser.error("--seed-demo-rule needs --api-key (or IOT_SIM_API_KEY)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    simulator = Simulator(args)
    signal.signal(signal.SIGINT, lambda *_: simulator.stop())
    signal.signal(signal.SIGTERM, lambda *_: simulator.stop())
    stats = simulator.run()
    print(
        f"iot-sim: published {stats.published}, acknowledged {stats.acked}, failed {stats.failed}, "
        f"commands answered {stats.commands}",
        file=sys.stderr,
    )
    if stats.acked < stats.published:
        raise SystemExit(1)
