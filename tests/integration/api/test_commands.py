"""Commands to devices against the real database, Redis and Mosquitto: a device subscribed to its command
topic receives the CommandMessage, the ``command`` event reaches the device's Redis channel, and a broker
that is down or goes away gives 503 with the command recorded as failed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
import gmqtt
import msgspec
import pytest
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient

from iot_api.state import services_of
from iot_common.messages import CommandEvent, CommandMessage, decode_event
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_common.topics import RedisNames, command_topic
from iot_testkit.channels import subscribe_confirmed
from iot_testkit.processes import free_port, mosquitto
from iot_testkit.waiting import wait_for
from tests.integration.api.conftest import ClientFactory
from tests.integration.api.test_alerts import make_device, next_message
from tests.integration.api.test_devices import assert_problem

Client = AsyncTestClient[Any]


class Device:
    """A device's MQTT client subscribed to its command topic; received messages land in a queue."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.messages: asyncio.Queue[tuple[bytes, int, dict[str, Any]]] = asyncio.Queue()
        self.client = gmqtt.Client(f"dev-{device_id}-{uuid.uuid4().hex[:6]}")
        self.client.on_message = self._on_message

    async def _on_message(self, _c: Any, _t: str, payload: bytes, qos: int, properties: Any) -> int:
        await self.messages.put((payload, qos, properties))
        return 0

    async def connect(self, mqtt_url: str) -> None:
        hostport = mqtt_url.removeprefix("mqtt://").rstrip("/")
        host, port = hostport.rsplit(":", 1)
        await self.client.connect(host, int(port), version=gmqtt.constants.MQTTv50)
        subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.client.on_subscribe = lambda *_: subscribed.done() or subscribed.set_result(None)
        self.client.subscribe(command_topic(self.device_id), qos=1)
        await asyncio.wait_for(subscribed, 5)

    async def next(self, timeout: float = 5.0) -> tuple[bytes, int, dict[str, Any]]:
        return await asyncio.wait_for(self.messages.get(), timeout)


@pytest.fixture
async def device(client: Client, writer: dict[str, str], mqtt_url: str, unique: str) -> AsyncIterator[Device]:
    dev = Device(f"dev-{unique}")
    await make_device(client, writer, dev.device_id)
    await dev.connect(mqtt_url)
    yield dev
    await dev.client.disconnect()


@pytest.fixture
async def events(redis: aioredis.Redis, redis_names: RedisNames, unique: str) -> AsyncIterator[Any]:
    pubsub = redis.pubsub()
    await subscribe_confirmed(pubsub, redis_names.device_channel(DEFAULT_TENANT_ID, f"dev-{unique}"))
    yield pubsub
    await pubsub.aclose()


async def test_a_command_reaches_the_device_and_its_channel(
    client: Client, writer: dict[str, str], reader: dict[str, str], device: Device, events: Any
) -> None:
    path = f"/api/v1/devices/{device.device_id}/commands"
    response = await client.post(
        path, json={"name": "reboot", "params": {"delay_s": 5, "mode": "soft"}, "ttl_s": 120}, headers=writer
    )
    assert response.status_code == 201, response.text
    command = response.json()
    assert command["state"] == "sent"
    assert command["error"] is None
    assert command["name"] == "reboot"
    assert command["params"] == {"delay_s": 5, "mode": "soft"}
    assert response.headers["location"] == f"{path}/{command['id']}"
    expires_at = datetime.fromisoformat(command["expires_at"])
    created_at = datetime.fromisoformat(command["created_at"])
    assert abs((expires_at - created_at).total_seconds() - 120) < 1

    payload, qos, properties = await device.next()
    message = msgspec.json.decode(payload, type=CommandMessage)
    assert message == CommandMessage(
        id=command["id"], name="reboot", params={"delay_s": 5, "mode": "soft"}, expires_at=expires_at
    )
    assert qos == 1
    assert 0 < properties["message_expiry_interval"][0] <= 120

    event = decode_event(await next_message(events))
    assert isinstance(event, CommandEvent)
    assert (event.id, event.state, event.name, event.device_id) == (
        command["id"],
        "sent",
        "reboot",
        device.device_id,
    )

    got = await client.get(f"{path}/{command['id']}", headers=reader)
    assert got.status_code == 200
    assert got.json() == command


async def test_commands_list_newest_first_with_cursor(
    client: Client, writer: dict[str, str], device: Device
) -> None:
    path = f"/api/v1/devices/{device.device_id}/commands"
    ids = []
    for i in range(5):
        response = await client.post(path, json={"name": f"c{i}"}, headers=writer)
        ids.append(response.json()["id"])
        assert response.json()["expires_at"] is not None  # the default TTL
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get(path, params=params, headers=writer)).json()
        seen += [c["id"] for c in page["items"]]
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert seen == ids[::-1]
    for _ in ids:
        await device.next()


async def test_command_errors_and_scopes(
    client: Client, writer: dict[str, str], reader: dict[str, str], device: Device, unique: str
) -> None:
    path = f"/api/v1/devices/{device.device_id}/commands"
    assert_problem(await client.post(path, json={"name": "x"}), 401)
    assert_problem(await client.post(path, json={"name": "x"}, headers=reader), 403)
    assert_problem(await client.get(path), 401)
    assert_problem(await client.post(path, json={"name": "bad name"}, headers=writer), 422, "name")
    assert_problem(await client.post(path, json={}, headers=writer), 422, "name")
    assert_problem(await client.post(path, json={"name": "x", "ttl_s": 0}, headers=writer), 422, "ttl_s")
    assert_problem(await client.post(path, json={"name": "x", "bogus": 1}, headers=writer), 422)
    nul = {"name": "x", "params": {"k": "a\x00"}}
    assert_problem(await client.post(path, json=nul, headers=writer), 422, "params.k")
    assert_problem(await client.get(f"{path}?cursor=nope", headers=reader), 422, "cursor")

    unknown = f"/api/v1/devices/nobody-{unique}/commands"
    assert_problem(await client.post(unknown, json={"name": "x"}, headers=writer), 404)
    assert_problem(await client.get(unknown, headers=reader), 404)
    assert_problem(await client.get(f"{path}/{uuid.uuid4()}", headers=reader), 404)
    assert_problem(await client.get(f"{path}/not-a-uuid", headers=reader), 404)
    # A command is found only under its own device.
    other = f"other-{unique}"
    await make_device(client, writer, other)
    command = (await client.post(path, json={"name": "x"}, headers=writer)).json()
    assert_problem(await client.get(f"/api/v1/devices/{other}/commands/{command['id']}", headers=reader), 404)
    assert (await device.next())[0]
    # Nothing reached the device for the refused requests.
    assert device.messages.empty()


async def test_broker_unreachable_gives_503_and_a_failed_command(
    make_client: ClientFactory,
    writer: dict[str, str],
    db: asyncpg.Connection[Any],
    unique: str,
    events: Any,
    admin: dict[str, str],
) -> None:
    client = await make_client(mqtt_url=f"mqtt://127.0.0.1:{free_port()}", api_command_puback_timeout_s=0.2)
    device_id = f"dev-{unique}"
    await make_device(client, admin, device_id)
    response = await client.post(
        f"/api/v1/devices/{device_id}/commands", json={"name": "reboot"}, headers=admin
    )
    body = assert_problem(response, 503)
    assert response.headers["retry-after"] == "5"
    row = await db.fetchrow("SELECT id, state, error FROM commands WHERE device_id = $1", device_id)
    assert row is not None
    assert row["state"] == "failed"
    assert "not connected" in row["error"]
    assert str(row["id"]) in body["detail"]
    event = decode_event(await next_message(events))
    assert isinstance(event, CommandEvent)
    assert event.state == "failed"
    assert event.error == row["error"]

    listed = (await client.get(f"/api/v1/devices/{device_id}/commands", headers=admin)).json()
    assert [c["state"] for c in listed["items"]] == ["failed"]
    # Readiness reports MQTT but does not depend on it.
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["postgres"] == "ok"
    assert ready.json()["checks"]["mqtt"] != "ok"


async def test_commands_fail_while_the_broker_is_away_and_work_after_it_returns(
    make_client: ClientFactory, admin: dict[str, str], unique: str
) -> None:
    port = free_port()
    device_id = f"dev-{unique}"
    with mosquitto(port=port) as url:
        client = await make_client(mqtt_url=url)
        publisher = services_of(client.app.state).commands.publisher
        assert publisher.is_connected
        await make_device(client, admin, device_id)
        path = f"/api/v1/devices/{device_id}/commands"
        assert (await client.post(path, json={"name": "a"}, headers=admin)).status_code == 201
    await wait_for(lambda: not publisher.is_connected, 15, "the publisher to see the broker go")
    assert_problem(await client.post(path, json={"name": "b"}, headers=admin), 503)
    with mosquitto(port=port) as url:
        dev = Device(device_id)
        await dev.connect(url)
        await wait_for(lambda: publisher.is_connected, 40, "the publisher to reconnect")
        response = await client.post(path, json={"name": "c"}, headers=admin)
        assert response.status_code == 201, response.text
        assert msgspec.json.decode((await dev.next())[0], type=CommandMessage).name == "c"
        await dev.client.disconnect()
    states = [(c["name"], c["state"]) for c in (await client.get(path, headers=admin)).json()["items"]]
    assert states == [("c", "sent"), ("b", "failed"), ("a", "sent")]


async def test_a_command_for_an_offline_device_is_queued_not_published(
    client: Client,
    writer: dict[str, str],
    reader: dict[str, str],
    device: Device,
    events: Any,
    db: asyncpg.Connection[Any],
) -> None:
    await db.execute("UPDATE devices SET status = 'offline' WHERE id = $1", device.device_id)
    path = f"/api/v1/devices/{device.device_id}/commands"
    response = await client.post(path, json={"name": "reboot", "ttl_s": 60}, headers=writer)
    assert response.status_code == 201, response.text
    command = response.json()
    assert command["state"] == "queued"
    expires_at = datetime.fromisoformat(command["expires_at"])
    assert abs((expires_at - datetime.fromisoformat(command["created_at"])).total_seconds() - 60) < 1
    event = decode_event(await next_message(events))
    assert isinstance(event, CommandEvent)
    assert (event.id, event.state) == (command["id"], "queued")
    assert (await client.get(f"{path}/{command['id']}", headers=reader)).json()["state"] == "queued"
    # Online again (status as ingest records it): the next command is published at once, and only it
    # reaches the device (the queued one is ingest's to publish).
    await db.execute("UPDATE devices SET status = 'online' WHERE id = $1", device.device_id)
    sent = (await client.post(path, json={"name": "ping"}, headers=writer)).json()
    assert sent["state"] == "sent"
    message = msgspec.json.decode((await device.next())[0], type=CommandMessage)
    assert message.id == sent["id"]
    assert device.messages.empty()
