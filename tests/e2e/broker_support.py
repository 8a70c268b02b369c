"""The shipped broker set-up for end-to-end tests: a private Mosquitto with the shipped configuration and
users (``deploy/mosquitto/dynsec-init.sh``), and ``iot-api`` plus ``iot-ingest`` connected to it as their
own service users."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from iot_testkit.processes import DYNSEC_PLUGIN, ServiceProcess, Start, free_port, mosquitto_process

ROOT = Path(__file__).resolve().parents[2]
PASSWORDS = {
    "MQTT_ADMIN_PASSWORD": "admin-password-0123456789",
    "MQTT_INGEST_PASSWORD": "ingest-password-0123456789",
    "MQTT_API_PASSWORD": "api-password-0123456789",
    "MQTT_SIM_PASSWORD": "sim-password-0123456789",
}


def shipped_config(port: int, data_dir: Path) -> str:
    """The shipped deploy/mosquitto/mosquitto.conf with this machine's paths and a private port."""
    text = (ROOT / "deploy/mosquitto/mosquitto.conf").read_text()
    replaced = (
        text.replace("listener 1883", f"listener {port} 127.0.0.1")
        .replace("/usr/lib/mosquitto_dynamic_security.so", DYNSEC_PLUGIN)
        .replace("/mosquitto/data/", f"{data_dir}/")
        .replace("/mosquitto/data", str(data_dir))
    )
    settings = [line for line in replaced.splitlines() if line and not line.startswith("#")]
    assert not [line for line in settings if "/mosquitto/" in line], settings
    return replaced


@contextlib.contextmanager
def shipped_broker() -> Iterator[int]:
    """A private broker with the shipped configuration and users (dynsec-init.sh); yields its port."""
    if not Path(DYNSEC_PLUGIN).exists():
        pytest.fail(f"{DYNSEC_PLUGIN} missing: install Debian's mosquitto package")
    folder = Path(tempfile.mkdtemp(prefix="iot-identity-"))
    folder.chmod(0o755)
    if os.geteuid() == 0:
        # Started as root, mosquitto runs as `mosquitto`, which saves the dynsec file in this folder.
        shutil.chown(folder, "mosquitto", "mosquitto")
    env = {
        **os.environ,
        **PASSWORDS,
        "DYNSEC_FILE": str(folder / "dynamic-security.json"),
        "DYNSEC_PLUGIN": DYNSEC_PLUGIN,
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


@dataclass
class Platform:
    broker: int
    api: ServiceProcess
    api_base: str
    ingest: ServiceProcess
    ingest_base: str
    http: httpx.AsyncClient
    """A client of the API with the bootstrap key."""

    async def stop(self) -> None:
        """Close the client and stop both services, which must exit cleanly."""
        await self.http.aclose()
        assert self.api.stop() == 0
        assert self.ingest.stop() == 0


def start_platform(
    broker: int,
    service: Start,
    database_url: str,
    redis_url: str,
    name: str,
    bootstrap_key: str,
    *,
    wait_ingest: bool = True,
) -> Platform:
    """``iot-api`` and ``iot-ingest`` as their own broker users; ``name`` (unique per test) makes their
    Redis prefix, share group and client id. Ingest's ``/readyz`` (connected and subscribed: its user
    works with its role) is waited for unless ``wait_ingest`` is false."""
    api_port, ingest_port = free_port(), free_port()
    api = service(
        "iot-api",
        {
            "IOT_DATABASE_URL": database_url,
            "IOT_REDIS_URL": redis_url,
            "IOT_API_PORT": str(api_port),
            "IOT_BOOTSTRAP_API_KEY": bootstrap_key,
            "IOT_REDIS_PREFIX": name,
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
            "IOT_REDIS_PREFIX": name,
            "IOT_MQTT_URL": f"mqtt://ingest:{PASSWORDS['MQTT_INGEST_PASSWORD']}@127.0.0.1:{broker}",
            "IOT_MQTT_SHARE_GROUP": name,
            "IOT_MQTT_CLIENT_ID": f"ingest-{name}",
            "IOT_INGEST_HTTP_PORT": str(ingest_port),
            "IOT_INGEST_BATCH_DELAY_MS": "20",
            "IOT_INGEST_RULES_REFRESH_S": "1",
        },
    )
    api_base, ingest_base = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{ingest_port}"
    api.wait_http(f"{api_base}/readyz")
    if wait_ingest:
        ingest.wait_http(f"{ingest_base}/readyz")
    http = httpx.AsyncClient(base_url=api_base, headers={"X-API-Key": bootstrap_key}, timeout=15)
    return Platform(broker, api, api_base, ingest, ingest_base, http)
