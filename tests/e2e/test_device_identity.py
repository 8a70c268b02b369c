"""Device identity end to end: a Mosquitto with the dynamic security plugin, set up by the shipped
``deploy/mosquitto/dynsec-init.sh`` and ``mosquitto.conf``, ``iot-api`` provisioning it, ``iot-ingest``
connected as its own service user, and devices connecting with the credentials the API issued.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import gmqtt
import httpx
import pytest

from iot_common.dynsec import DynsecAdmin
from iot_common.topics import command_topic, telemetry_topic
from tests.support.processes import BIN, ServiceProcess, free_port, mosquitto_process

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
PASSWORDS = {
    "MQTT_ADMIN_PASSWORD": "admin-password-0123456789",
    "MQTT_INGEST_PASSWORD": "ingest-password-0123456789",
    "MQTT_API_PASSWORD": "api-password-0123456789",
    "MQTT_SIM_PASSWORD": "sim-password-0123456789",
}
BOOTSTRAP_KEY = "iotk_identity0001_" + "i" * 24
REFUSED = r"(?i)not authori[sz]ed|bad user|refused|code|unauthori"

Start = Callable[[str, Mapping[str, str]], ServiceProcess]


def shipped_config(port: int, data_dir: Path) -> str:
    """The shipped deploy/mosquitto/mosquitto.conf with this machine's paths and a private port."""
    text = (ROOT / "deploy/mosquitto/mosquitto.conf").read_text()
    replaced = (
        text.replace("listener 1883", f"listener {port} 127.0.0.1")
        .replace("/usr/lib/mosquitto_dynamic_security.so", PLUGIN)
        .replace("/mosquitto/data/", f"{data_dir}/")
        .replace("/mosquitto/data", str(data_dir))
    )
    settings = [line for line in replaced.splitlines() if line and not line.startswith("#")]
    assert not [line for line in settings if "/mosquitto/" in line], settings
    return replaced


@contextlib.contextmanager
def shipped_broker() -> Iterator[int]:
    """A private broker with the shipped configuration and users (dynsec-init.sh); yields its port."""
    if not Path(PLUGIN).exists():
        pytest.fail(f"{PLUGIN} missing: install Debian's mosquitto package")
    folder = Path(tempfile.mkdtemp(prefix="iot-identity-"))
    folder.chmod(0o755)
    if os.geteuid() == 0:
        # Started as root, mosquitto runs as `mosquitto`, which saves the dynsec file in this folder.
        shutil.chown(folder, "mosquitto", "mosquitto")
    env = {
        **os.environ,
        **PASSWORDS,
        "DYNSEC_FILE": str(folder / "dynamic-security.json"),
        "DYNSEC_PLUGIN": PLUGIN,
        "DYNSEC_INIT_PORT": str(free_port()),
    }
    script = ROOT / "deploy/mosquitto/dynsec-init.sh"
    subprocess.run(["sh", str(script)], env=env, check=True, capture_output=True, timeout=60)
    # A second run leaves the existing file (and what was provisioned since) alone.
    again = subprocess.run(["sh", str(script)], env=env, check=True, capture_output=True, text=True)
    assert "nothing to do" in again.stdout
    port = free_port()
    config = folder / "mosquitto.conf"
    config.write_text(shipped_config(port, folder))
    try:
        with mosquitto_process(config, port):
            yield port
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def test_devices_are_confined_to_their_own_topics_and_revocation_cuts_them(
    broker: int,
    service: Start,
    database_url: str,
    redis_url: str,
    db: asyncpg.Connection[Any],
    unique: str,
) -> None:
    api_port, ingest_port = free_port(), free_port()
    api = service(
        "iot-api",
        {
            "IOT_DATABASE_URL": database_url,
            "IOT_REDIS_URL": redis_url,
            "IOT_API_PORT": str(api_port),
            "IOT_BOOTSTRAP_API_KEY": BOOTSTRAP_KEY,
            "IOT_API_CACHE_NAMESPACE": f"iot:id:{unique}:",
            "IOT_API_ROLLUP_INTERVAL_S": "0",
            "IOT_MQTT_URL": f"mqtt://api:{PASSWORDS['MQTT_API_PASSWORD']}@127.0.0.1:{broker}",
            "IOT_MQTT_ADMIN_URL": f"mqtt://admin:{PASSWORDS['MQTT_ADMIN_PASSWORD']}@127.0.0.1:{broker}",
        },
    )
    ingest = service(
        "iot-ingest",
        {
            "IOT_DATABASE_URL": database_url,
            "IOT_REDIS_URL": redis_url,
            "IOT_MQTT_URL": f"mqtt://ingest:{PASSWORDS['MQTT_INGEST_PASSWORD']}@127.0.0.1:{broker}",
            "IOT_MQTT_SHARE_GROUP": f"ingest-{unique}",
            "IOT_MQTT_CLIENT_ID": f"ingest-{unique}",
            "IOT_INGEST_HTTP_PORT": str(ingest_port),
            "IOT_INGEST_BATCH_DELAY_MS": "20",
        },
    )
    api.wait_http(f"http://127.0.0.1:{api_port}/readyz")
    # Ready means connected and subscribed: the ingest service user works with its role.
    ingest.wait_http(f"http://127.0.0.1:{ingest_port}/readyz")

    http = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{api_port}", headers={"X-API-Key": BOOTSTRAP_KEY}, timeout=10
    )
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
    await http.aclose()
    assert api.stop() == 0
    assert ingest.stop() == 0


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
