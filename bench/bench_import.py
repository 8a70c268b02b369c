"""Bulk provisioning rate: ``POST /api/v1/devices/import?credentials=true`` of 100,000 devices in one request,
then one of them is let in by the broker's check and publishes.

Two runs, each on a fresh database (``iot_bench_import``) with ``iot-api`` as a process on 127.0.0.1:

1. ``--devices`` (100,000) devices, the API checking credentials itself (the EMQX hooks,
   ``IOT_MQTT_HOOK_SECRET``, no ``IOT_MQTT_ADMIN_URL``): import time and rate; then the authentication hook
   answers ``allow`` to the last device's password from the answer's CSV and ``deny`` to a wrong one.
   Then the same number of other devices streamed (``Accept: application/x-ndjson``): when each phase
   line arrived, and the last byte.
2. ``--broker-devices`` (1,000) devices with the API provisioning a private Mosquitto with the dynamic
   security plugin (``IOT_MQTT_ADMIN_URL``): import time and rate; then the last device connects with its
   password and publishes its telemetry, which an observer (the admin user) receives through the broker.
   Mosquitto's plugin saves its whole file after each command, so this rate falls as the broker's users
   grow (docs/device-identity.md); 100,000 users through it would take hours.

Run: ``make bench`` or ``uv run python bench/bench_import.py [--devices 100000] [--broker-devices 1000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import sys
import time
import uuid
from pathlib import Path

import gmqtt
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support import api_process, migrated_database
from iot_common.topics import telemetry_topic
from iot_testkit.measure import rss_mib
from iot_testkit.processes import dynsec_mosquitto, free_port

DATABASE = "iot_bench_import"
API_KEY = "iotk_benchimport0_" + "i" * 24
HOOK_SECRET = "bench-import-hook-secret-0123456789"
ADMIN_PASSWORD = "bench-import-admin-secret-0123"


def import_devices(base: str, count: int, prefix: str) -> tuple[list[dict[str, str]], float, int]:
    """Import ``count`` devices with credentials; (the answer's rows, seconds, request body bytes)."""
    body = "id,name,type,site\n" + "".join(
        f"{prefix}-{i:06d},meter {i},meter,s{i % 50}\n" for i in range(count)
    )
    began = time.monotonic()
    response = httpx.post(
        f"{base}/api/v1/devices/import?credentials=true",
        content=body,
        headers={"X-API-Key": API_KEY, "Content-Type": "text/csv"},
        timeout=1800,
    )
    seconds = time.monotonic() - began
    if response.status_code != 201:
        raise SystemExit(f"import failed: {response.status_code} {response.text[:500]}")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    if len(rows) != count:
        raise SystemExit(f"expected {count} credentials, got {len(rows)}")
    return rows, seconds, len(body)


def import_streamed(base: str, count: int, prefix: str) -> tuple[list[tuple[str, float]], float, int]:
    """The same import with ``Accept: application/x-ndjson``: (each phase line and the seconds it arrived
    after the request, seconds to the last byte, credential lines)."""
    body = "id,name,type,site\n" + "".join(
        f"{prefix}-{i:06d},meter {i},meter,s{i % 50}\n" for i in range(count)
    )
    phases: list[tuple[str, float]] = []
    credentials = 0
    began = time.monotonic()
    with httpx.stream(
        "POST",
        f"{base}/api/v1/devices/import?credentials=true",
        content=body,
        headers={"X-API-Key": API_KEY, "Content-Type": "text/csv", "Accept": "application/x-ndjson"},
        timeout=1800,
    ) as response:
        if response.status_code != 200:
            raise SystemExit(f"streamed import failed: {response.status_code} {response.read()[:500]!r}")
        for line in response.iter_lines():
            item = json.loads(line)
            if "phase" in item:
                phases.append((item["phase"], time.monotonic() - began))
            elif "password" in item:
                credentials += 1
    seconds = time.monotonic() - began
    if phases[-1][0] != "done" or credentials != count:
        raise SystemExit(f"streamed import: {phases}, {credentials} credentials")
    return phases, seconds, credentials


def hooks_run(count: int) -> None:
    url = asyncio.run(migrated_database(DATABASE, fresh=True))
    env = {
        "IOT_DATABASE_URL": url,
        "IOT_REDIS_URL": "redis://127.0.0.1:6379/0",
        "IOT_MQTT_URL": f"mqtt://127.0.0.1:{free_port()}",  # no broker needed: the hooks are the check
        "IOT_API_CACHE_NAMESPACE": f"bench-import-{uuid.uuid4().hex[:8]}:",
        "IOT_BOOTSTRAP_API_KEY": API_KEY,
        "IOT_MQTT_HOOK_SECRET": HOOK_SECRET,
    }
    with api_process(env, timeout=60) as api:
        before = rss_mib(api.pid)
        rows, seconds, size = import_devices(api.base, count, "bulk")
        after = rss_mib(api.pid, "VmHWM")
        phases, streamed_s, _ = import_streamed(api.base, count, "stream")
        last = rows[-1]
        answers = []
        for password in (last["password"], last["password"] + "x"):
            answer = httpx.post(
                f"{api.base}/api/v1/mqtt/authn",
                json={"username": last["username"], "password": password},
                headers={"X-Hook-Secret": HOOK_SECRET},
            )
            answers.append(answer.json()["result"])
    print(
        f"import {count:,} devices with credentials (hooks), one request of {size / 2**20:.1f} MiB:"
        f" {seconds:.1f} s, {count / seconds:,.0f} devices/s; iot-api RSS {before:.0f} MiB before,"
        f" peak {after:.0f} MiB"
    )
    steps = ", ".join(f"{name} {at:.1f} s" for name, at in phases)
    print(f"  the same import streamed (Accept: application/x-ndjson): {steps}; last byte {streamed_s:.1f} s")
    print(f"  authn hook for {last['id']}: its password -> {answers[0]}, a wrong one -> {answers[1]}")
    if answers != ["allow", "deny"]:
        raise SystemExit("the imported credential is not accepted by the authentication hook")


async def publish_as(hostport: str, device: dict[str, str]) -> float:
    """The device connects and publishes; the admin observer receives it. Seconds from connect to receipt."""
    host, port = hostport.split(":")
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    observer = gmqtt.Client(f"bench-observer-{uuid.uuid4().hex[:6]}")
    observer.set_auth_credentials("admin", ADMIN_PASSWORD)
    subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    observer.on_subscribe = lambda *_: subscribed.done() or subscribed.set_result(None)

    def on_message(_c: object, _t: str, payload: bytes, _q: int, _p: object) -> int:
        if not received.done():
            received.set_result(payload)
        return 0

    observer.on_message = on_message
    await observer.connect(host, int(port))
    observer.subscribe(telemetry_topic(device["id"]), qos=1)
    await asyncio.wait_for(subscribed, 5)
    began = time.monotonic()
    client = gmqtt.Client(f"bench-{device['id']}")
    client.set_config({"reconnect_retries": 0})
    client.set_auth_credentials(device["username"], device["password"])
    await client.connect(host, int(port))
    client.publish(telemetry_topic(device["id"]), b'{"metrics": {"kwh": 1.5}}', qos=1)
    payload = await asyncio.wait_for(received, 10)
    seconds = time.monotonic() - began
    assert b"kwh" in payload
    await client.disconnect()
    await observer.disconnect()
    return seconds


def broker_run(count: int) -> None:
    url = asyncio.run(migrated_database(DATABASE, fresh=True))
    with dynsec_mosquitto(ADMIN_PASSWORD, prefix="iot-bench-import-") as hostport:
        env = {
            "IOT_DATABASE_URL": url,
            "IOT_REDIS_URL": "redis://127.0.0.1:6379/0",
            "IOT_MQTT_URL": f"mqtt://admin:{ADMIN_PASSWORD}@{hostport}",
            "IOT_MQTT_ADMIN_URL": f"mqtt://admin:{ADMIN_PASSWORD}@{hostport}",
            "IOT_API_CACHE_NAMESPACE": f"bench-import-{uuid.uuid4().hex[:8]}:",
            "IOT_BOOTSTRAP_API_KEY": API_KEY,
            "IOT_API_IMPORT_MAX_BROKER_DEVICES": str(count),
        }
        with api_process(env, timeout=60) as api:
            rows, seconds, _ = import_devices(api.base, count, "dyn")
            latency = asyncio.run(publish_as(hostport, rows[-1]))
    print(
        f"import {count:,} devices with credentials (Mosquitto dynamic security): {seconds:.1f} s,"
        f" {count / seconds:,.0f} devices/s"
    )
    print(
        f"  {rows[-1]['id']} connected with its password and published; received in {latency * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--broker-devices", type=int, default=1000)
    args = parser.parse_args()
    hooks_run(args.devices)
    if args.broker_devices:
        broker_run(args.broker_devices)


if __name__ == "__main__":
    main()
