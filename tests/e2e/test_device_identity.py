"""Device identity end to end: a Mosquitto with the dynamic security plugin, set up by the shipped
``deploy/mosquitto/dynsec-init.sh`` and ``mosquitto.conf``, ``iot-api`` provisioning it, ``iot-ingest``
connected as its own service user, and devices connecting with the credentials the API issued.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import gmqtt
import pytest

from iot_api.dynsec import DynsecAdmin
from iot_common.topics import command_topic, telemetry_topic
from iot_testkit.processes import BIN, Start
from iot_testkit.waiting import wait_for
from tests.e2e.broker_support import PASSWORDS, shipped_broker, start_platform

BOOTSTRAP_KEY = "iotk_identity0001_" + "i" * 24
REFUSED = r"(?i)not authori[sz]ed|bad user|refused|code|unauthori"


@pytest.fixture
def broker() -> Iterator[int]:
    """A private broker with the shipped configuration and users; yields its port."""
    with shipped_broker() as port:
        yield port


class Device:
    """A device's MQTT connection (gmqtt, MQTT 5) that records what it receives and when it is cut."""

    def __init__(self, client: gmqtt.Client) -> None:
        self.client = client
        self.received: asyncio.Queue[str] = asyncio.Queue()
        self.subacks: asyncio.Queue[tuple[int, ...]] = asyncio.Queue()
        self.cut = asyncio.Event()
        client.on_message = self._on_message
        client.on_subscribe = lambda _c, _mid, codes, _p: self.subacks.put_nowait(tuple(codes))
        client.on_disconnect = lambda *_: self.cut.set()

    def _on_message(self, _c: Any, topic: str, payload: bytes, _qos: int, _p: Any) -> int:
        self.received.put_nowait(f"{topic}={payload.decode()}")
        return 0

    async def subscribe(self, topic: str) -> int:
        self.client.subscribe(topic, qos=1)
        codes = await asyncio.wait_for(self.subacks.get(), 5)
        return codes[0]


async def connect(port: int, username: str | None, password: str | None) -> Device:
    client = gmqtt.Client(f"t-{username}-{uuid.uuid4().hex[:8]}")
    client.set_config({"reconnect_retries": 0})
    if username:
        client.set_auth_credentials(username, password)
    device = Device(client)
    await client.connect("127.0.0.1", port)
    return device


async def test_devices_are_confined_to_their_own_topics_and_revocation_cuts_them(
    broker: int,
    service: Start,
    database_url: str,
    redis_url: str,
    db: asyncpg.Connection[Any],
    unique: str,
) -> None:
    # Ready means connected and subscribed: the ingest service user works with its role.
    platform = start_platform(broker, service, database_url, redis_url, f"id-{unique}", BOOTSTRAP_KEY)
    http = platform.http
    a, b = f"a-{unique}", f"b-{unique}"
    creds = {}
    for device_id in (a, b):
        response = await http.post("/api/v1/devices", json={"id": device_id})
        assert response.status_code == 201, response.text
        creds[device_id] = response.json()["mqtt"]["password"]

    with pytest.raises(Exception, match=REFUSED):
        await connect(broker, None, None)
    with pytest.raises(Exception, match=REFUSED):
        await connect(broker, a, creds[a] + "x")
    with pytest.raises(Exception, match=REFUSED):
        await connect(broker, a, creds[b])

    device = await connect(broker, a, creds[a])
    assert await device.subscribe(command_topic(b)) >= 0x80, "subscribed to another device's commands"
    assert await device.subscribe(command_topic(a)) == 1
    commander = await connect(broker, "api", PASSWORDS["MQTT_API_PASSWORD"])
    commander.client.publish(command_topic(b), b"for-b", qos=1)
    commander.client.publish(command_topic(a), b"for-a", qos=1)
    # Same publisher and subscriber: had b's command come through, it would have arrived first.
    assert await asyncio.wait_for(device.received.get(), 5) == f"{command_topic(a)}=for-a"
    assert device.received.empty()

    now_ms = int(time.time() * 1000)
    device.client.publish(telemetry_topic(b), f'{{"ts": {now_ms}, "metrics": {{"t": 66.6}}}}', qos=1)
    device.client.publish(telemetry_topic(a), f'{{"ts": {now_ms}, "metrics": {{"t": 21.5}}}}', qos=1)

    async def stored() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM telemetry WHERE device_id = $1", a))

    await wait_for(stored, 15, "the device's own reading in the database")
    # The spoofed reading was sent first on the same connection: refused by the broker, never seen.
    assert await db.fetchval("SELECT count(*) FROM telemetry WHERE device_id = $1", b) == 0
    assert await db.fetchval("SELECT count(*) FROM ingest_rejects WHERE device_id = $1", b) == 0
    assert not device.cut.is_set(), "a refused publish must not cost the device its connection"

    revoked = await http.delete(f"/api/v1/devices/{a}/credentials")
    assert revoked.status_code == 204
    await asyncio.wait_for(device.cut.wait(), 5)
    with pytest.raises(Exception, match=REFUSED):
        await connect(broker, a, creds[a])
    rotated = await http.post(f"/api/v1/devices/{a}/credentials")
    assert rotated.status_code == 201
    again = await connect(broker, a, rotated.json()["password"])
    await again.client.disconnect()

    other = await connect(broker, b, creds[b])
    assert (await http.delete(f"/api/v1/devices/{b}")).status_code == 204
    await asyncio.wait_for(other.cut.wait(), 5)
    with pytest.raises(Exception, match=REFUSED):
        await connect(broker, b, creds[b])

    await commander.client.disconnect()
    await platform.stop()


async def test_the_simulator_publishes_with_each_device_s_own_credentials(
    broker: int, tmp_path: Path, unique: str
) -> None:
    admin = DynsecAdmin(f"mqtt://admin:{PASSWORDS['MQTT_ADMIN_PASSWORD']}@127.0.0.1:{broker}")
    await admin.connect()
    try:
        for name in ("s1", "s2"):
            await admin.provision_device(f"{name}-{unique}", f"secret-{name}-{unique}")
    finally:
        await admin.close()

    def simulate(lines: list[str]) -> subprocess.CompletedProcess[str]:
        path = tmp_path / f"creds-{len(lines)}-{uuid.uuid4().hex[:6]}.csv"
        path.write_text("# device_id,username,password\n" + "\n".join(lines) + "\n")
        return subprocess.run(
            [str(BIN / "iot-sim"), "--credentials", str(path), "--duration", "1", "--rate", "5", "--quiet"],
            env={**os.environ, "IOT_MQTT_URL": f"mqtt://127.0.0.1:{broker}"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    own = simulate(
        [f"s1-{unique},s1-{unique},secret-s1-{unique}", f"s2-{unique},s2-{unique},secret-s2-{unique}"]
    )
    assert own.returncode == 0, own.stderr
    assert "failed 0" in own.stderr
    # Speaking for s2 with s1's credentials: the broker refuses every publish (PUBACK "not authorised").
    spoof = simulate([f"s2-{unique},s1-{unique},secret-s1-{unique}"])
    assert spoof.returncode == 1, spoof.stderr
    assert "acknowledged 0" in spoof.stderr
