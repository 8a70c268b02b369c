"""Device state end to end: ``iot-api``, ``iot-ingest`` and ``iot-realtime`` as processes, a private
Mosquitto, and devices that are real MQTT clients.

A PATCH reaches the device; its report empties the delta and reaches the WebSocket as a ``state`` frame
(and ``latest`` on subscribe carries the state); a stale ``If-Match`` changes nothing; a device that was
offline during three PATCHes gets only the latest desired state when it connects; kill -9 of ingest while
reports flow loses no acknowledged report.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import gmqtt
import httpx
import pytest

from iot_common.topics import state_desired_topic, state_reported_topic, status_topic
from iot_testkit.loadgen import device_ids, publish_async
from iot_testkit.metrics import scrape
from iot_testkit.processes import ServiceProcess, Start, free_port, mosquitto
from iot_testkit.waiting import wait_for
from tests.e2e.realtime_support import open_ws, recv_json, start_realtime, subscribe, token
from tests.e2e.test_api import AUTH, api_env


@pytest.fixture
def broker() -> Iterator[str]:
    with mosquitto() as url:
        yield url


class Platform:
    def __init__(self, service: Start, database_url: str, redis_url: str, broker: str, unique: str) -> None:
        self.service = service
        self.prefix = f"st{unique[-8:]}"
        self.common = {"IOT_REDIS_PREFIX": self.prefix, "IOT_MQTT_URL": broker}
        self.database_url, self.redis_url, self.unique = database_url, redis_url, unique
        port = free_port()
        env = {**api_env(database_url, redis_url, port, self.prefix), **self.common}
        self.api = service("iot-api", env)
        self.base = f"http://127.0.0.1:{port}"
        self.api.wait_http(f"{self.base}/readyz")
        self.ingest_id = f"ingest-{unique}"
        self.ingest = self.start_ingest()
        self.realtime = start_realtime(service, database_url, redis_url, self.common)

    def start_ingest(self) -> ServiceProcess:
        port = free_port()
        env = {
            "IOT_DATABASE_URL": self.database_url,
            "IOT_REDIS_URL": self.redis_url,
            "IOT_MQTT_SHARE_GROUP": f"g-{self.unique}",
            "IOT_MQTT_CLIENT_ID": self.ingest_id,
            "IOT_INGEST_HTTP_PORT": str(port),
            "IOT_INGEST_BATCH_DELAY_MS": "20",
            **self.common,
        }
        proc = self.service("iot-ingest", env)
        self.ingest_base = f"http://127.0.0.1:{port}"
        proc.wait_http(f"{self.ingest_base}/readyz")
        return proc

    def republished(self) -> float:
        """Desired states ingest published again because their device came online (the running one)."""
        samples = scrape(self.ingest_base)
        return samples.get("iot_ingest_desired_state_republished_total{outcome=published}", 0.0)


@pytest.fixture
def platform(service: Start, database_url: str, redis_url: str, broker: str, unique: str) -> Platform:
    return Platform(service, database_url, redis_url, broker, unique)


@pytest.fixture
async def http(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=platform.base, headers=AUTH, timeout=20) as client:
        yield client


class Device:
    """A device as firmware would be: clean session, subscribes to its desired state, reports."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.desired: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.client = gmqtt.Client(f"dev-{device_id}-{uuid.uuid4().hex[:6]}", clean_session=True)
        self.client.on_message = self._on_message

    async def _on_message(self, _c: Any, _t: str, payload: bytes, _q: int, _p: Any) -> int:
        await self.desired.put(json.loads(payload))
        return 0

    async def connect(self, url: str) -> None:
        host, port = url.removeprefix("mqtt://").rstrip("/").rsplit(":", 1)
        await self.client.connect(host, int(port), version=gmqtt.constants.MQTTv50)
        subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.client.on_subscribe = lambda *_: subscribed.done() or subscribed.set_result(None)
        self.client.subscribe(state_desired_topic(self.device_id), qos=1)
        await asyncio.wait_for(subscribed, 5)
        self.client.publish(status_topic(self.device_id), b"online", qos=1)

    def report(self, reported: dict[str, Any], version: int | None) -> None:
        body = {"reported": reported, "version": version}
        self.client.publish(state_reported_topic(self.device_id), json.dumps(body).encode(), qos=1)

    async def next(self, timeout: float = 10.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.desired.get(), timeout)


async def next_state(ws: Any) -> dict[str, Any]:
    """The next ``state`` frame (the device's ``status`` frames are skipped)."""
    while True:
        frame = await recv_json(ws)
        if frame["type"] != "status":
            return frame


async def create_device(http: httpx.AsyncClient, device_id: str) -> None:
    response = await http.post("/api/v1/devices", json={"id": device_id, "type": "thermostat"})
    assert response.status_code == 201, response.text


@pytest.mark.timeout(120)
async def test_desired_reaches_the_device_and_its_report_empties_the_delta(
    platform: Platform, http: httpx.AsyncClient, broker: str, unique: str
) -> None:
    device_id = f"thermo-{unique}"
    await create_device(http, device_id)
    device = Device(device_id)
    await device.connect(broker)
    path = f"/api/v1/devices/{device_id}/state"
    async with open_ws(platform.realtime.url(token())) as ws:
        frames = await subscribe(ws, 1, [device_id])
        assert frames[0]["type"] == "latest"
        assert "state" not in frames[0]  # never had a state

        patched = await http.patch(path, json={"desired": {"target_temperature": 22.5, "mode": "eco"}})
        assert patched.status_code == 200, patched.text
        assert patched.headers["etag"] == '"1"'
        message = await device.next()
        while message["version"] < 1:  # nothing older may come, but be explicit about what counts
            message = await device.next()
        assert message == {
            "version": 1,
            "desired": {"target_temperature": 22.5, "mode": "eco"},
            "delta": {"target_temperature": 22.5, "mode": "eco"},
        }
        frame = await next_state(ws)
        assert frame == {
            "type": "state",
            "device_id": device_id,
            "desired": message["desired"],
            "reported": {},
            "delta": message["delta"],
            "version": 1,
        }

        device.report({"target_temperature": 22.5, "mode": "eco", "firmware": "1.2"}, version=1)
        frame = await next_state(ws)
        assert frame["type"] == "state"
        assert frame["delta"] == {}
        assert frame["version"] == 2
        assert frame["reported"] == {"target_temperature": 22.5, "mode": "eco", "firmware": "1.2"}
        state = await http.get(path)
        assert state.json()["delta"] == {}
        assert state.json()["reported_at"] is not None
        assert state.headers["etag"] == '"2"'

        # A stale If-Match: 412 and nothing changed (no new version, no frame, nothing to the device).
        stale = await http.patch(path, json={"desired": {"mode": "off"}}, headers={"If-Match": '"1"'})
        assert stale.status_code == 412, stale.text
        assert (await http.get(path)).json() == state.json()
        history = (await http.get(f"{path}/history")).json()["items"]
        assert [(c["version"], c["side"], c["actor"]) for c in history] == [
            (2, "reported", "device"),
            (1, "desired", "key:" + history[1]["actor"].removeprefix("key:")),
        ]
        assert history[0]["applied_version"] == 1

    # A new subscriber's latest frame carries the state.
    async with open_ws(platform.realtime.url(token())) as ws:
        latest = (await subscribe(ws, 1, [device_id]))[0]
        assert latest["state"] == {
            "desired": {"target_temperature": 22.5, "mode": "eco"},
            "reported": {"target_temperature": 22.5, "mode": "eco", "firmware": "1.2"},
            "delta": {},
            "version": 2,
        }

    # Besides the API's version 1, only what ingest re-published because the device came online: its hook
    # re-reads the state when it runs, after the device's "online" is stored (version 1, or 2 when it ran
    # after the report on a busy machine). A report publishes no desired message, and the 412 sent nothing.
    def accounted_for() -> bool:
        return device.desired.qsize() == platform.republished()

    await wait_for(accounted_for, 10, "each further desired message to be an online re-publication")
    rest = []
    while not device.desired.empty():
        rest.append(device.desired.get_nowait()["version"])
    assert set(rest) <= {1, 2}, rest
    await device.client.disconnect()


@pytest.mark.timeout(120)
async def test_a_device_offline_during_three_patches_gets_only_the_latest(
    platform: Platform, http: httpx.AsyncClient, broker: str, unique: str
) -> None:
    device_id = f"sleeper-{unique}"
    await create_device(http, device_id)
    path = f"/api/v1/devices/{device_id}/state"
    for i in range(3):
        assert (await http.patch(path, json={"desired": {"step": i}})).status_code == 200
    device = Device(device_id)
    await device.connect(broker)
    # Twice the same: the retained message on subscribe, then ingest's re-publication after "online".
    received = [await device.next(), await device.next()]
    assert received == [{"version": 3, "desired": {"step": 2}, "delta": {"step": 2}}] * 2, received
    await device.client.disconnect()


@pytest.mark.timeout(180)
async def test_kill_9_of_ingest_while_reports_flow_loses_no_acknowledged_report(
    platform: Platform, http: httpx.AsyncClient, broker: str, db: asyncpg.Connection[Any], unique: str
) -> None:
    devices = device_ids(f"rep-{unique}", 10)
    for device_id in devices:
        await create_device(http, device_id)
    killed = asyncio.Event()

    def progress(sent: int) -> None:
        if sent == 1000 and not killed.is_set():
            platform.ingest.kill()
            killed.set()

    publishing = asyncio.create_task(
        publish_async(
            broker,
            [state_reported_topic(d) for d in devices],
            3000,
            payload=lambda seq, _: b'{"reported": {"s%d": %d}}' % (seq, seq),
            rate=1000,
            on_progress=progress,
            topic_prefix="",
        )
    )
    await asyncio.wait_for(killed.wait(), 60)
    platform.ingest = await asyncio.to_thread(platform.start_ingest)
    result = await publishing
    assert result.acked == result.sent == 3000

    async def stored() -> bool:
        count = await db.fetchval(
            "SELECT count(*) FROM device_state_history WHERE side = 'reported' AND device_id = ANY($1)",
            devices,
        )
        return bool(count == result.acked)

    await wait_for(stored, 60, "every acknowledged report in the history")
    rows = await db.fetch("SELECT device_id, reported FROM device_state WHERE device_id = ANY($1)", devices)
    reported = {r["device_id"]: r["reported"] for r in rows}
    for seq in result.acked_seqs:
        assert reported[devices[seq % len(devices)]].get(f"s{seq}") == seq, seq
    versions = await db.fetch(
        "SELECT device_id, count(*) AS n, max(version) AS top FROM device_state_history"
        " WHERE device_id = ANY($1) GROUP BY 1",
        devices,
    )
    assert all(r["n"] == r["top"] for r in versions)  # one version per change, none skipped or repeated
