"""Commands under the shipped broker ACLs: a private Mosquitto set up by ``deploy/mosquitto/dynsec-init.sh``,
``iot-api`` and ``iot-ingest`` connected as their own service users, a device with the credentials the
API issued it.

- With the shipped roles, ingest's subscription to the command answers is granted, an answer is recorded,
  and commands reach the device from the API and from an alert rule's action.
- A role without the right to publish commands: the broker refuses each one (PUBACK 0x87), and the command
  becomes ``failed`` with the reason, never ``sent``; the rule's action run is ``failed``.
- A role without the right to read the answers: ingest's ``/readyz`` fails, naming the subscription.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import gmqtt
import httpx
import pytest

from iot_api.dynsec import DynsecAdmin
from iot_common.topics import command_ack_topic, command_topic, telemetry_topic
from iot_testkit.metrics import metric
from iot_testkit.processes import Start
from iot_testkit.waiting import wait_for
from tests.e2e.broker_support import PASSWORDS, Platform, shipped_broker, start_platform

BOOTSTRAP_KEY = "iotk_brokeracl001_" + "b" * 24
REFUSED = "broker refused: not authorized (135)"


class Device:
    """A device on MQTT 5 with its own credentials: collects its commands and answers each one."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.client = gmqtt.Client(f"t-dev-{device_id}")
        self.client.set_config({"reconnect_retries": 0})
        self.commands: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.subacks: asyncio.Queue[tuple[int, ...]] = asyncio.Queue()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda _c, _mid, codes, _p: self.subacks.put_nowait(tuple(codes))

    async def connect(self, port: int, password: str) -> None:
        self.client.set_auth_credentials(self.device_id, password)
        await self.client.connect("127.0.0.1", port)
        self.client.subscribe(command_topic(self.device_id), qos=1)
        assert await asyncio.wait_for(self.subacks.get(), 10) == (1,)

    def _on_message(self, client: gmqtt.Client, topic: str, payload: bytes, _q: int, _p: Any) -> int:
        command = json.loads(payload)
        self.commands.put_nowait(command)
        answer = {"id": command["id"], "status": "ok", "result": {"done": command["name"]}}
        client.publish(command_ack_topic(self.device_id), json.dumps(answer).encode(), qos=1)
        return 0

    def reading(self, value: float) -> None:
        body = {"ts": int(time.time() * 1000), "metrics": {"temperature": value}}
        self.client.publish(telemetry_topic(self.device_id), json.dumps(body).encode(), qos=1)


async def get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.get(url)


async def remove_acl(port: int, role: str, acltype: str, topic: str) -> None:
    """Take one right away from a shipped role, as an operator with an older or edited file would have."""
    admin = DynsecAdmin(f"mqtt://admin:{PASSWORDS['MQTT_ADMIN_PASSWORD']}@127.0.0.1:{port}")
    await admin.connect()
    try:
        await admin.run({"command": "removeRoleACL", "rolename": role, "acltype": acltype, "topic": topic})
    finally:
        await admin.close()


@pytest.fixture
def broker() -> Iterator[int]:
    with shipped_broker() as port:
        yield port


async def add_device(platform: Platform, device_id: str) -> Device:
    response = await platform.http.post("/api/v1/devices", json={"id": device_id})
    assert response.status_code == 201, response.text
    device = Device(device_id)
    await device.connect(platform.broker, response.json()["mqtt"]["password"])
    return device


async def add_command_rule(platform: Platform, device_id: str) -> None:
    rule = {
        "name": "too hot",
        "device_id": device_id,
        "metric": "temperature",
        "op": ">",
        "threshold": 30.0,
        "action": {"type": "command", "name": "fan_on", "params": {"speed": 3}, "expires_s": 60},
    }
    response = await platform.http.post("/api/v1/alert-rules", json=rule)
    assert response.status_code == 201, response.text

    await wait_for(
        lambda: metric(platform.ingest_base, "iot_ingest_rules_loaded") == 1, 30, "ingest to load the rule"
    )


async def action_run(db: asyncpg.Connection[Any]) -> asyncpg.Record | None:
    return await db.fetchrow("SELECT * FROM action_runs WHERE finished_at IS NOT NULL")


async def test_under_the_shipped_acls_commands_reach_the_device_and_answers_are_recorded(
    broker: int,
    service: Start,
    database_url: str,
    redis_url: str,
    db: asyncpg.Connection[Any],
    unique: str,
) -> None:
    platform = start_platform(broker, service, database_url, redis_url, f"acl-{unique}", BOOTSTRAP_KEY)
    readyz = (await get(f"{platform.ingest_base}/readyz")).json()
    assert readyz["checks"]["mqtt"] == "ok", readyz
    device = await add_device(platform, f"acl-{unique}")

    # From the API: the broker takes it, the device gets it, ingest records its answer.
    response = await platform.http.post(
        f"/api/v1/devices/{device.device_id}/commands", json={"name": "reboot"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["state"] in ("sent", "acked")
    command = await asyncio.wait_for(device.commands.get(), 10)
    assert command["id"] == response.json()["id"]

    async def acked(command_id: str) -> bool:
        row = await db.fetchrow("SELECT state, result FROM commands WHERE id = $1::uuid", command_id)
        return row is not None and row["state"] == "acked"

    await wait_for(lambda: acked(command["id"]), 15, "the device's answer recorded by ingest")

    # From an alert rule's action, sent by ingest as its own user.
    await add_command_rule(platform, device.device_id)
    device.reading(45.0)
    action_command = await asyncio.wait_for(device.commands.get(), 15)
    assert (action_command["name"], action_command["params"]) == ("fan_on", {"speed": 3})
    await wait_for(lambda: acked(action_command["id"]), 15, "the answer to the action's command")
    run = await wait_for(lambda: action_run(db), 15, "the action run recorded")
    assert (run["state"], str(run["command_id"]), run["last_error"]) == (
        "succeeded",
        action_command["id"],
        None,
    )

    await device.client.disconnect()
    await platform.stop()


async def test_a_command_the_broker_refuses_is_failed_with_the_reason_never_sent(
    broker: int,
    service: Start,
    database_url: str,
    redis_url: str,
    db: asyncpg.Connection[Any],
    unique: str,
) -> None:
    for role in ("service-api", "service-ingest"):
        await remove_acl(broker, role, "publishClientSend", "devices/commands/+")
    platform = start_platform(broker, service, database_url, redis_url, f"acl-{unique}", BOOTSTRAP_KEY)
    device = await add_device(platform, f"acl-{unique}")

    response = await platform.http.post(
        f"/api/v1/devices/{device.device_id}/commands", json={"name": "reboot"}
    )
    assert response.status_code == 503, response.text
    assert REFUSED in response.json()["detail"]
    row = await db.fetchrow("SELECT state, error FROM commands WHERE device_id = $1", device.device_id)
    assert (row["state"], row["error"]) == ("failed", REFUSED)

    await add_command_rule(platform, device.device_id)
    device.reading(45.0)
    run = await wait_for(lambda: action_run(db), 15, "the action run recorded")
    assert (run["state"], run["last_error"]) == ("failed", REFUSED)
    command = await db.fetchrow("SELECT state, error FROM commands WHERE id = $1", run["command_id"])
    assert (command["state"], command["error"]) == ("failed", REFUSED)
    # Nothing reached the device, and no command of the device was ever marked sent.
    assert device.commands.empty()
    states = await db.fetch("SELECT state FROM commands WHERE device_id = $1", device.device_id)
    assert {r["state"] for r in states} == {"failed"}

    await device.client.disconnect()
    await platform.stop()


async def test_a_refused_subscription_makes_ingest_not_ready(
    broker: int,
    service: Start,
    database_url: str,
    redis_url: str,
    unique: str,
) -> None:
    await remove_acl(broker, "service-ingest", "subscribePattern", "$share/+/devices/commands/+/ack")
    platform = start_platform(
        broker, service, database_url, redis_url, f"acl-{unique}", BOOTSTRAP_KEY, wait_ingest=False
    )
    readyz = f"{platform.ingest_base}/readyz"

    async def refused() -> httpx.Response | None:
        try:
            response = await get(readyz)
        except httpx.HTTPError:
            return None
        return response if "refused" in response.text else None

    response = await wait_for(refused, 30, "ingest's /readyz to report the refused subscription")
    assert response.status_code == 503
    mqtt = response.json()["checks"]["mqtt"]
    assert f"$share/acl-{unique}/devices/commands/+/ack (not authorized (135))" in mqtt, mqtt
    assert "subscription refused" in platform.ingest.logs()

    await platform.stop()
