"""``iot-sim`` as a process against the platform under the shipped broker ACLs: its devices answer commands
sent through the API, and the demo alert rule it seeds is tripped by its temperature spikes.

- Devices registered by the simulator connect with their own credentials (``--api-key``).
- Without per-device credentials, one connection as the broker's ``sim`` service user answers for all.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from iot_sim.demo import DEMO_RULE_NAME, DEVICE_TYPE, seed_demo_rule
from iot_testkit.processes import Start
from iot_testkit.waiting import wait_for
from tests.e2e.broker_support import PASSWORDS, Platform, shipped_broker, start_platform

BOOTSTRAP_KEY = "iotk_simulatorkey_" + "s" * 24
UNKNOWN = "unknown command 'self_destruct' (known: ping, reboot, set_interval)"


@pytest.fixture
def broker() -> Iterator[int]:
    with shipped_broker() as port:
        yield port


@contextlib.contextmanager
def simulator(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``iot-sim ARGS --quiet``; on exit stopped with SIGTERM, which it must obey with status 0 (every
    message it published, command answers included, acknowledged by the broker)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "iot-sim"), *args, "--quiet"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert code == 0, log.read_text()[-4000:]


async def reading_count(db: asyncpg.Connection[Any], device_id: str) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM telemetry WHERE device_id = $1 AND metric = 'temperature'", device_id
    )
    return count


async def wait_for_readings(db: asyncpg.Connection[Any], device_id: str, at_least: int, log: Path) -> int:
    async def enough() -> int:
        count = await reading_count(db, device_id)
        return count if count >= at_least else 0

    try:
        return int(await wait_for(enough, 60, f"{at_least} readings of {device_id}"))
    except AssertionError as exc:
        logs = await asyncio.to_thread(log.read_text)
        raise AssertionError(f"{exc}\n{logs[-4000:]}") from None


async def command(platform: Platform, device_id: str, name: str, **params: Any) -> dict[str, Any]:
    """Send a command through the API and wait until the device's answer is recorded."""
    sent = await platform.http.post(
        f"/api/v1/devices/{device_id}/commands", json={"name": name, "params": params}
    )
    assert sent.status_code == 201, sent.text

    async def answered() -> dict[str, Any] | None:
        found = (await platform.http.get(f"/api/v1/devices/{device_id}/commands/{sent.json()['id']}")).json()
        return found if found["state"] not in ("pending", "sent") else None

    result: dict[str, Any] = await wait_for(answered, 30, f"the answer to {name}")
    return result


async def desired_applied(platform: Platform, device_id: str, desired: dict[str, Any]) -> dict[str, Any]:
    """PATCH the desired state and wait until the device reported it (empty delta); the state."""
    patched = await platform.http.patch(f"/api/v1/devices/{device_id}/state", json={"desired": desired})
    assert patched.status_code == 200, patched.text

    async def applied() -> dict[str, Any] | None:
        state: dict[str, Any] = (await platform.http.get(f"/api/v1/devices/{device_id}/state")).json()
        return state if state["version"] > patched.json()["version"] and not state["delta"] else None

    result: dict[str, Any] = await wait_for(applied, 30, f"{device_id} to apply {desired}")
    return result


async def test_simulated_devices_with_their_own_credentials_answer_commands_and_spikes_trip_the_demo_rule(
    broker: int,
    service: Start,
    database_url: str,
    redis_url: str,
    db: asyncpg.Connection[Any],
    unique: str,
    artifacts_dir: Path,
) -> None:
    platform = start_platform(broker, service, database_url, redis_url, f"sim-{unique}", BOOTSTRAP_KEY)
    prefix, log = f"s{unique}", artifacts_dir / "sim.log"
    device = f"{prefix}-0000"
    args = ["--devices", "2", "--rate", "0.2", "--prefix", prefix, "--spike-probability", "0.3"]
    args += ["--mqtt-url", f"mqtt://127.0.0.1:{broker}", "--api-url", platform.api_base]
    args += ["--api-key", BOOTSTRAP_KEY, "--seed-demo-rule"]
    with simulator(args, log):
        # The simulator subscribes to its commands before it publishes its first reading.
        await wait_for_readings(db, device, 1, log)

        ping = await command(platform, device, "ping")
        assert (ping["state"], ping["error"]) == ("acked", None), ping
        assert ping["result"]["pong"] is True
        assert ping["result"]["interval_s"] == 5.0
        reboot = await command(platform, device, "reboot", delay=1)
        assert (reboot["state"], reboot["result"]["rebooted"]) == ("acked", True), reboot
        unknown = await command(platform, device, "self_destruct")
        assert (unknown["state"], unknown["result"], unknown["error"]) == ("failed", None, UNKNOWN)
        invalid = await command(platform, device, "set_interval", interval_s=-1)
        assert invalid["state"] == "failed"
        assert "interval_s" in invalid["error"]

        # Device state, through the device's own ACLs: applied and reported with the version.
        state = await desired_applied(platform, device, {"target_temperature": 35})
        assert state["reported"] == {"target_temperature": 35}
        history = (await platform.http.get(f"/api/v1/devices/{device}/state/history")).json()["items"]
        assert (history[0]["actor"], history[0]["applied_version"]) == ("device", history[1]["version"])

        # Every 5 s, then every 0.05 s: 40 more readings arrive long before 5 s x 40 have passed.
        before = await reading_count(db, device)
        faster = await command(platform, device, "set_interval", interval_s=0.05)
        assert (faster["state"], faster["result"]) == ("acked", {"interval_s": 0.05, "previous_s": 5.0})
        await wait_for_readings(db, device, before + 40, log)

        rules = (await platform.http.get("/api/v1/alert-rules", params={"device_type": DEVICE_TYPE})).json()
        (rule,) = [r for r in rules["items"] if r["name"] == DEMO_RULE_NAME]

        async def alert() -> dict[str, Any] | None:
            alerts = (await platform.http.get("/api/v1/alerts", params={"device_id": device})).json()
            return next((a for a in alerts["items"] if a["rule_id"] == rule["id"]), None)

        tripped = await wait_for(alert, 60, "an alert of the demo rule")
        assert tripped["metric"] == "temperature"
        assert tripped["value"] > rule["threshold"]

        # Seeding again finds the rule: still one.
        assert seed_demo_rule(platform.api_base, BOOTSTRAP_KEY) == (rule["id"], False)
        rules = (await platform.http.get("/api/v1/alert-rules", params={"device_type": DEVICE_TYPE})).json()
        assert [r["name"] for r in rules["items"]].count(DEMO_RULE_NAME) == 1
    assert "commands answered 5" in log.read_text()
    await platform.stop()


async def test_one_connection_as_the_sim_service_user_answers_for_every_device(
    broker: int,
    service: Start,
    database_url: str,
    redis_url: str,
    db: asyncpg.Connection[Any],
    unique: str,
    artifacts_dir: Path,
) -> None:
    platform = start_platform(broker, service, database_url, redis_url, f"simu-{unique}", BOOTSTRAP_KEY)
    prefix, log = f"u{unique}", artifacts_dir / "sim.log"
    for i in range(2):
        created = await platform.http.post("/api/v1/devices", json={"id": f"{prefix}-{i:04d}"})
        assert created.status_code == 201, created.text
    sim_url = f"mqtt://sim:{PASSWORDS['MQTT_SIM_PASSWORD']}@127.0.0.1:{broker}"
    with simulator(["--devices", "2", "--rate", "1", "--prefix", prefix, "--mqtt-url", sim_url], log):
        for i in range(2):
            await wait_for_readings(db, f"{prefix}-{i:04d}", 1, log)
        for i in range(2):
            ping = await command(platform, f"{prefix}-{i:04d}", "ping")
            assert (ping["state"], ping["result"]["pong"]) == ("acked", True), ping
        unknown = await command(platform, f"{prefix}-0001", "self_destruct")
        assert (unknown["state"], unknown["error"]) == ("failed", UNKNOWN)
        state = await desired_applied(platform, f"{prefix}-0001", {"target_temperature": 18})
        assert state["reported"] == {"target_temperature": 18}
    await platform.stop()


async def test_register_imports_the_fleet_in_one_request_and_each_device_publishes_with_its_own_login(
    broker: int,
    service: Start,
    database_url: str,
    redis_url: str,
    db: asyncpg.Connection[Any],
    unique: str,
    artifacts_dir: Path,
) -> None:
    platform = start_platform(broker, service, database_url, redis_url, f"reg-{unique}", BOOTSTRAP_KEY)
    prefix, log = f"r{unique}", artifacts_dir / "sim-register.log"
    # One device of the fleet exists already: it gets new credentials, the others are imported.
    existing = await platform.http.post("/api/v1/devices", json={"id": f"{prefix}-0001"})
    assert existing.status_code == 201, existing.text
    args = ["--devices", "3", "--rate", "2", "--prefix", prefix, "--duration", "30"]
    args += ["--mqtt-url", f"mqtt://127.0.0.1:{broker}", "--api-url", platform.api_base]
    args += ["--api-key", BOOTSTRAP_KEY, "--register"]
    with simulator(args, log):
        for i in range(3):
            await wait_for_readings(db, f"{prefix}-{i:04d}", 2, log)
    text = log.read_text()
    assert "registered 3 devices through the import endpoint" in text, text[-2000:]
    devices = (await platform.http.get("/api/v1/devices", params={"q": prefix})).json()["items"]
    # The existing device keeps its type; the imported ones have the simulator's.
    types = {d["id"]: d["type"] for d in devices}
    assert types == {
        f"{prefix}-0000": DEVICE_TYPE,
        f"{prefix}-0001": "generic",
        f"{prefix}-0002": DEVICE_TYPE,
    }
    await platform.stop()
