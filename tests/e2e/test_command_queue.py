"""Commands that wait for offline devices, end to end: ``iot-api``, ``iot-ingest`` and ``iot-realtime`` as
processes, a private Mosquitto, real PostgreSQL and Redis, a device as a real MQTT client (clean session,
its ``offline`` status as will message) and a WebSocket client watching the device's ``command`` frames.

- Commands posted while the device is offline are ``queued``; the device comes online 10 s later, receives
  them in order, answers, and they are ``acked``; the WebSocket shows queued, sent, acked for each.
- A command whose TTL passes before the device comes online is ``expired`` and never delivered: the first
  thing the device receives is the command queued after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gmqtt
import httpx
import pytest
from websockets.asyncio.client import ClientConnection

from iot_common.topics import command_ack_topic, command_topic, status_topic
from iot_testkit.loadgen import publish_async
from iot_testkit.processes import Start, free_port, mosquitto
from iot_testkit.waiting import wait_for
from tests.e2e.realtime_support import open_ws, recv_json, start_realtime, subscribe, token
from tests.e2e.test_sim import simulator

BOOTSTRAP_KEY = "iotk_e2ecmdqueue0_" + "q" * 24
WAIT_OFFLINE_S = 10.0
"""How long the device stays offline after its commands were posted (the scenario of the issue)."""


@pytest.fixture
def broker() -> Iterator[str]:
    with mosquitto() as url:
        yield url


@dataclass
class Services:
    http: httpx.AsyncClient
    realtime_url: str


@pytest.fixture
async def platform(
    service: Start, database_url: str, redis_url: str, broker: str, unique: str
) -> AsyncIterator[Services]:
    realtime = start_realtime(service, database_url, redis_url)
    common = {
        "IOT_DATABASE_URL": database_url,
        "IOT_REDIS_URL": redis_url,
        "IOT_REDIS_PREFIX": realtime.names.prefix,  # one deployment: the realtime service's channels
        "IOT_MQTT_URL": broker,
    }
    api_port, ingest_port = free_port(), free_port()
    api = service(
        "iot-api",
        {
            **common,
            "IOT_API_PORT": str(api_port),
            "IOT_BOOTSTRAP_API_KEY": BOOTSTRAP_KEY,
            "IOT_API_ROLLUP_INTERVAL_S": "0",
            "IOT_API_RATE_LIMIT_PER_MINUTE": "100000",
        },
    )
    ingest = service(
        "iot-ingest",
        {
            **common,
            "IOT_MQTT_SHARE_GROUP": f"q{unique}",
            "IOT_MQTT_CLIENT_ID": f"ingest-q{unique}",
            "IOT_INGEST_HTTP_PORT": str(ingest_port),
            "IOT_INGEST_BATCH_DELAY_MS": "20",
            "IOT_INGEST_COMMAND_EXPIRY_INTERVAL_S": "0.5",
        },
    )
    api_base = f"http://127.0.0.1:{api_port}"
    api.wait_http(f"{api_base}/readyz")
    ingest.wait_http(f"http://127.0.0.1:{ingest_port}/readyz")
    async with httpx.AsyncClient(base_url=api_base, headers={"X-API-Key": BOOTSTRAP_KEY}, timeout=15) as http:
        yield Services(http, realtime.url(token({"read"})))
    assert api.stop() == 0, api.logs()[-4000:]
    assert ingest.stop() == 0, ingest.logs()[-4000:]


class Device:
    """A device: clean session, ``offline`` as its will message, subscribed to its commands before it
    announces ``online``; answers each command ``ok`` and keeps what it received, in order."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        will = gmqtt.Message(status_topic(device_id), b"offline", qos=1)
        self.client = gmqtt.Client(
            f"dev-{device_id}-{uuid.uuid4().hex[:6]}", clean_session=True, will_message=will
        )
        self.client.on_message = self._on_message

    async def _on_message(self, client: Any, topic: str, payload: bytes, qos: int, properties: Any) -> int:
        command = json.loads(payload)
        await self.received.put(command)
        ack = {"id": command["id"], "status": "ok", "result": {"done": command["name"]}}
        client.publish(command_ack_topic(self.device_id), json.dumps(ack).encode(), qos=1)
        return 0

    async def come_online(self, broker: str) -> None:
        host, port = broker.removeprefix("mqtt://").rstrip("/").rsplit(":", 1)
        await self.client.connect(host, int(port), version=gmqtt.constants.MQTTv50)
        subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.client.on_subscribe = lambda *_: subscribed.done() or subscribed.set_result(None)
        self.client.subscribe(command_topic(self.device_id), qos=1)
        await asyncio.wait_for(subscribed, 5)
        self.client.publish(status_topic(self.device_id), b"online", qos=1)

    async def next(self, timeout: float = 15) -> dict[str, Any]:
        return await asyncio.wait_for(self.received.get(), timeout)

    async def close(self) -> None:
        if self.client.is_connected:
            await self.client.disconnect()


async def announce_offline(broker: str, device_id: str) -> None:
    """Publish the device's ``offline`` status (as the broker does with a device's will) and wait for the
    PUBACK."""
    result = await publish_async(
        broker, [device_id], 1, payload=lambda *_: b"offline", topic_prefix="devices/status/"
    )
    assert result.acked == 1


async def make_offline_device(services: Services, broker: str, device_id: str) -> None:
    created = await services.http.post("/api/v1/devices", json={"id": device_id, "type": "thermo"})
    assert created.status_code == 201, created.text
    await announce_offline(broker, device_id)

    async def offline() -> bool:
        return bool((await services.http.get(f"/api/v1/devices/{device_id}")).json()["status"] == "offline")

    await wait_for(offline, 15, f"{device_id} offline")


async def post_command(services: Services, device_id: str, name: str, ttl_s: int) -> dict[str, Any]:
    response = await services.http.post(
        f"/api/v1/devices/{device_id}/commands", json={"name": name, "params": {"n": name}, "ttl_s": ttl_s}
    )
    assert response.status_code == 201, response.text
    command: dict[str, Any] = response.json()
    return command


class Frames:
    """The ``command`` and ``status`` frames of one WebSocket subscription, collected in the background."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        while True:
            frame = await recv_json(self.ws, timeout=120)
            if frame["type"] in ("command", "status"):
                self.frames.append(frame)

    def states(self, command_id: str) -> list[str]:
        return [f["state"] for f in self.frames if f["type"] == "command" and f["id"] == command_id]

    async def wait(self, command_id: str, last: str) -> list[str]:
        await wait_for(lambda: last in self.states(command_id), 20, f"a {last} frame of {command_id}")
        return self.states(command_id)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


@contextlib.asynccontextmanager
async def watching(services: Services, device_id: str) -> AsyncIterator[Frames]:
    async with open_ws(services.realtime_url) as ws:
        frames = await subscribe(ws, 1, [device_id])
        assert frames[-1]["type"] == "ack", frames
        collector = Frames(ws)
        try:
            yield collector
        finally:
            await collector.close()


async def state_of(services: Services, device_id: str, command_id: str) -> str:
    found = await services.http.get(f"/api/v1/devices/{device_id}/commands/{command_id}")
    state: str = found.json()["state"]
    return state


async def test_queued_commands_reach_a_device_that_comes_online_later_in_order_and_are_acked(
    platform: Services, broker: str, unique: str
) -> None:
    device_id = f"q-{unique}"
    await make_offline_device(platform, broker, device_id)
    device = Device(device_id)
    async with watching(platform, device_id) as frames:
        commands = [
            await post_command(platform, device_id, name, 120) for name in ("first", "second", "third")
        ]
        assert [c["state"] for c in commands] == ["queued"] * 3
        for command in commands:
            assert await frames.wait(command["id"], "queued") == ["queued"]
        # Offline for a while (the scenario: it comes online 10 s later); nothing may expire meanwhile.
        await asyncio.sleep(WAIT_OFFLINE_S)
        assert [await state_of(platform, device_id, c["id"]) for c in commands] == ["queued"] * 3
        try:
            await device.come_online(broker)
            received = [await device.next() for _ in commands]
            assert [(r["id"], r["name"], r["params"]) for r in received] == [
                (c["id"], c["name"], {"n": c["name"]}) for c in commands
            ]
            for command in commands:
                assert await frames.wait(command["id"], "acked") == ["queued", "sent", "acked"]
            online = [f for f in frames.frames if f["type"] == "status"]
            assert [f["status"] for f in online][:1] == ["online"]
        finally:
            await device.close()
    for command in commands:
        found = (await platform.http.get(f"/api/v1/devices/{device_id}/commands/{command['id']}")).json()
        assert (found["state"], found["result"], found["error"]) == ("acked", {"done": command["name"]}, None)
    assert device.received.empty()


async def test_a_command_whose_ttl_passes_first_expires_and_is_never_delivered(
    platform: Services, broker: str, unique: str
) -> None:
    device_id = f"x-{unique}"
    await make_offline_device(platform, broker, device_id)
    device = Device(device_id)
    async with watching(platform, device_id) as frames:
        doomed = await post_command(platform, device_id, "doomed", 2)
        marker = await post_command(platform, device_id, "marker", 120)  # queued after it
        assert (doomed["state"], marker["state"]) == ("queued", "queued")
        # The TTL must really pass: this is the one wait on the clock.
        assert await frames.wait(doomed["id"], "expired") == ["queued", "expired"]
        assert await state_of(platform, device_id, doomed["id"]) == "expired"
        try:
            await device.come_online(broker)
            # Queued commands go out oldest first: had the expired one been published, it would come first.
            first = await device.next()
            assert (first["id"], first["name"]) == (marker["id"], "marker")
            assert await frames.wait(marker["id"], "acked") == ["queued", "sent", "acked"]
        finally:
            await device.close()
        assert frames.states(doomed["id"]) == ["queued", "expired"]
    assert device.received.empty()
    assert await state_of(platform, device_id, doomed["id"]) == "expired"


async def test_a_command_queued_for_a_simulated_device_reaches_it_when_the_simulator_starts(
    platform: Services, broker: str, unique: str, artifacts_dir: Path
) -> None:
    prefix = f"qs{unique}"
    device_id = f"{prefix}-0000"  # the simulator's first device
    await make_offline_device(platform, broker, device_id)
    ping = await post_command(platform, device_id, "ping", 120)
    assert ping["state"] == "queued"
    args = ["--devices", "1", "--rate", "0.2", "--prefix", prefix, "--will", "--mqtt-url", broker]
    with simulator(args, artifacts_dir / "sim.log"):

        async def answered() -> dict[str, Any] | None:
            found = (await platform.http.get(f"/api/v1/devices/{device_id}/commands/{ping['id']}")).json()
            return found if found["state"] not in ("queued", "pending", "sent") else None

        done = await wait_for(answered, 30, "the simulated device's answer to the queued ping")
    assert done["state"] == "acked", done
    assert done["result"]["pong"] is True
