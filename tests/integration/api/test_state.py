"""Device state against the real database, Redis and Mosquitto: a PATCH reaches the device (retained, on
``devices/state/{id}/desired``) and the device's Redis channel; ``If-Match`` refuses stale versions and
serializes concurrent patches; merge patch, limits, history."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import gmqtt
import msgspec
import pytest
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient

from iot_api.state import services_of
from iot_common.messages import StateEvent, decode_event
from iot_common.state import MAX_STATE_BYTES, MAX_STATE_DEPTH, DesiredMessage
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_common.topics import RedisNames, state_desired_topic
from iot_testkit.channels import subscribe_confirmed
from tests.integration.api.test_alerts import make_device, next_message
from tests.integration.api.test_devices import assert_problem

Client = AsyncTestClient[Any]


class StateDevice:
    """A device's MQTT client subscribed to its desired-state topic; received messages land in a queue."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.messages: asyncio.Queue[tuple[DesiredMessage, int, dict[str, Any]]] = asyncio.Queue()
        self.client = gmqtt.Client(f"st-{device_id}-{uuid.uuid4().hex[:6]}")
        self.client.on_message = self._on_message

    async def _on_message(self, _c: Any, _t: str, payload: bytes, qos: int, properties: Any) -> int:
        await self.messages.put((msgspec.json.decode(payload, type=DesiredMessage), qos, properties))
        return 0

    async def connect(self, mqtt_url: str) -> None:
        host, port = mqtt_url.removeprefix("mqtt://").rstrip("/").rsplit(":", 1)
        await self.client.connect(host, int(port), version=gmqtt.constants.MQTTv50)
        subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.client.on_subscribe = lambda *_: subscribed.done() or subscribed.set_result(None)
        self.client.subscribe(state_desired_topic(self.device_id), qos=1)
        await asyncio.wait_for(subscribed, 5)

    async def next(self, timeout: float = 5.0) -> tuple[DesiredMessage, int, dict[str, Any]]:
        return await asyncio.wait_for(self.messages.get(), timeout)


@pytest.fixture
async def device_id(client: Client, writer: dict[str, str], unique: str) -> str:
    await make_device(client, writer, f"st-{unique}")
    assert await services_of(client.app.state).state.publisher.wait_connected(10)
    return f"st-{unique}"


@pytest.fixture
async def events(redis: aioredis.Redis, redis_names: RedisNames, device_id: str) -> AsyncIterator[Any]:
    pubsub = redis.pubsub()
    await subscribe_confirmed(pubsub, redis_names.device_channel(DEFAULT_TENANT_ID, device_id))
    yield pubsub
    await pubsub.aclose()


async def test_patch_reaches_the_device_and_the_channel(
    client: Client, writer: dict[str, str], reader: dict[str, str], device_id: str, events: Any, mqtt_url: str
) -> None:
    device = StateDevice(device_id)
    await device.connect(mqtt_url)
    path = f"/api/v1/devices/{device_id}/state"
    empty = await client.get(path, headers=reader)
    assert empty.status_code == 200
    assert empty.headers["etag"] == '"0"'
    assert empty.json() == {
        "device_id": device_id,
        "desired": {},
        "reported": {},
        "delta": {},
        "version": 0,
        "desired_at": None,
        "reported_at": None,
    }
    response = await client.patch(
        path, json={"desired": {"target_temperature": 21.5, "led": {"on": True}}}, headers=writer
    )
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == '"1"'
    body = response.json()
    assert body["version"] == 1
    assert body["desired"] == body["delta"] == {"target_temperature": 21.5, "led": {"on": True}}
    assert body["desired_at"] is not None

    message, qos, _ = await device.next()
    assert message == DesiredMessage(1, body["desired"], body["delta"])
    assert qos == 1
    event = decode_event(await next_message(events))
    assert event == StateEvent(device_id, body["desired"], {}, body["delta"], 1)

    # A merge patch: null removes a key, objects merge key by key.
    second = await client.patch(
        path,
        json={"desired": {"led": {"on": None, "color": "red"}, "target_temperature": None}},
        headers=writer,
    )
    assert second.json()["desired"] == {"led": {"color": "red"}}
    assert (await device.next())[0].version == 2
    got = await client.get(path, headers=reader)
    assert got.headers["etag"] == '"2"'
    assert got.json() == second.json()

    history = (await client.get(f"{path}/history", params={"limit": 1}, headers=reader)).json()
    assert [c["version"] for c in history["items"]] == [2]
    assert history["items"][0]["side"] == "desired"
    assert history["items"][0]["patch"] == {"led": {"on": None, "color": "red"}, "target_temperature": None}
    assert history["items"][0]["actor"].startswith("key:")
    rest = await client.get(f"{path}/history", params={"cursor": history["next_cursor"]}, headers=reader)
    assert [c["version"] for c in rest.json()["items"]] == [1]
    await device.client.disconnect()


async def test_stale_if_match_is_412_and_changes_nothing(
    client: Client,
    writer: dict[str, str],
    admin: dict[str, str],
    device_id: str,
    db: asyncpg.Connection[Any],
) -> None:
    path = f"/api/v1/devices/{device_id}/state"
    first = await client.patch(path, json={"desired": {"a": 1}}, headers={**writer, "If-Match": '"0"'})
    assert first.status_code == 200, first.text
    stale = await client.patch(path, json={"desired": {"a": 2}}, headers={**writer, "If-Match": '"0"'})
    assert_problem(stale, 412)
    got = await client.get(path, headers=writer)
    assert got.json()["desired"] == {"a": 1}
    assert got.json()["version"] == 1
    assert await db.fetchval("SELECT count(*) FROM device_state_history WHERE device_id = $1", device_id) == 1
    ok = await client.patch(
        path, json={"desired": {"a": 3}}, headers={**writer, "If-Match": got.headers["etag"]}
    )
    assert ok.status_code == 200
    assert ok.json()["version"] == 2
    # Every PATCH is in the audit log, the refused one too.
    events = (await client.get("/api/v1/audit", headers=admin)).json()["items"]
    mine = [(e["action"], e["status"]) for e in events if e["target"] == f"devices/{device_id}/state"]
    assert mine == [("patchDesiredState", 200), ("patchDesiredState", 412), ("patchDesiredState", 200)]


async def test_concurrent_patches_serialize(client: Client, writer: dict[str, str], device_id: str) -> None:
    path = f"/api/v1/devices/{device_id}/state"

    async def patch(i: int, version: int | None) -> Any:
        headers = writer if version is None else {**writer, "If-Match": f'"{version}"'}
        return await client.patch(path, json={"desired": {f"k{i}": i}}, headers=headers)

    # With If-Match, round after round: exactly one 200 per version, the others 412.
    version = 0
    for _ in range(3):
        answers = await asyncio.gather(*(patch(i, version) for i in range(20)))
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200] + [412] * 19, statuses
        version += 1
        assert next(a for a in answers if a.status_code == 200).json()["version"] == version
    # Without: every patch merges, none lost, each its own version.
    answers = await asyncio.gather(*(patch(100 + i, None) for i in range(20)))
    assert {a.status_code for a in answers} == {200}
    assert sorted(a.json()["version"] for a in answers) == list(range(version + 1, version + 21))
    final = (await client.get(path, headers=writer)).json()
    assert {f"k{100 + i}" for i in range(20)} <= set(final["desired"])
    assert final["version"] == version + 20


async def test_a_device_that_connects_later_gets_only_the_latest(
    client: Client,
    writer: dict[str, str],
    admin: dict[str, str],
    device_id: str,
    mqtt_url: str,
    redis: aioredis.Redis,
    redis_names: RedisNames,
) -> None:
    path = f"/api/v1/devices/{device_id}/state"
    for i in range(3):
        assert (await client.patch(path, json={"desired": {"step": i}}, headers=writer)).status_code == 200
    device = StateDevice(device_id)
    await device.connect(mqtt_url)
    message, _, properties = await device.next()
    assert message == DesiredMessage(3, {"step": 2}, {"step": 2})
    assert properties.get("retain") in (1, True)
    with pytest.raises(TimeoutError):
        await device.next(timeout=0.5)  # nothing older follows
    await device.client.disconnect()

    # Deleted, then created again: no retained desired message, no state, no Redis copy left behind.
    assert (await client.delete(f"/api/v1/devices/{device_id}", headers=admin)).status_code == 204
    assert await redis.exists(redis_names.state_key(device_id)) == 0
    await make_device(client, writer, device_id)
    assert (await client.get(path, headers=writer)).json()["version"] == 0
    again = StateDevice(device_id)
    await again.connect(mqtt_url)
    with pytest.raises(TimeoutError):
        await again.next(timeout=1.0)
    await again.client.disconnect()


async def test_bad_input_is_a_named_4xx(
    client: Client, writer: dict[str, str], reader: dict[str, str], device_id: str
) -> None:
    path = f"/api/v1/devices/{device_id}/state"
    deep: dict[str, Any] = {}
    for _ in range(MAX_STATE_DEPTH):
        deep = {"k": deep}
    assert_problem(
        await client.patch(path, json={"desired": deep}, headers=writer),
        422,
        "desired" + ".k" * MAX_STATE_DEPTH,
    )
    big = {"blob": "x" * MAX_STATE_BYTES}
    assert_problem(await client.patch(path, json={"desired": big}, headers=writer), 422, "desired")
    # Two patches each within the limit, together past it: refused after merging.
    half = "x" * (MAX_STATE_BYTES // 2)
    assert (await client.patch(path, json={"desired": {"a": half}}, headers=writer)).status_code == 200
    assert_problem(await client.patch(path, json={"desired": {"b": half}}, headers=writer), 422, "desired")
    assert_problem(await client.patch(path, json={"desired": [1]}, headers=writer), 422)
    assert_problem(await client.patch(path, json={"desired": {}, "x": 1}, headers=writer), 422)
    assert_problem(
        await client.patch(path, json={"desired": {"a": "\u0000"}}, headers=writer), 422, "desired.a"
    )
    bad_tag = await client.patch(path, json={"desired": {}}, headers={**writer, "If-Match": "3"})
    assert_problem(bad_tag, 422, "If-Match")
    assert (await client.patch(path, json={"desired": {"c": 1}}, headers=reader)).status_code == 403
    assert_problem(await client.get("/api/v1/devices/nope-x/state", headers=reader), 404)
    assert (await client.get(path, headers=reader)).json()["version"] == 1
