"""Two tenants on one platform, end to end: ingest, realtime and the API as processes, a private Mosquitto,
real PostgreSQL and Redis, devices publishing over MQTT, WebSocket clients and HTTP.

Each tenant's WebSocket client subscribed to ``"*"`` sees its own devices' events and nothing of the other
tenant's; another tenant's device is refused exactly like one that does not exist; an alert rule fires on
its own tenant's devices only; dead letters are listed to the tenant of their device, and those of no known
device to platform admins only; a device auto-registered joins ``IOT_INGEST_AUTO_REGISTER_TENANT``, within
that tenant's ``max_devices``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from websockets.asyncio.client import ClientConnection

from iot_common.auth import issue_token, user_principal
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_testkit.processes import ServiceProcess, free_port, mosquitto
from iot_testkit.tokens import user_token
from tests.e2e.realtime_support import SECRET, Realtime, Start, open_ws, start_realtime, subscribe
from tests.e2e.test_alerts import reading, send
from tests.e2e.test_api import AUTH, api_env
from tests.e2e.test_ingest import Ingest, wait_for


@pytest.fixture
def broker() -> Iterator[str]:
    with mosquitto() as url:
        yield url


class Socket:
    """A WebSocket client whose frames are collected in the background."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for frame in self.ws:
            self.frames.append(json.loads(frame))

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == kind]

    def devices(self) -> set[str]:
        return {f["device_id"] for f in self.frames if "device_id" in f}

    async def wait(self, what: str, predicate: Any, timeout: float = 30) -> None:
        async def holds() -> bool:
            return bool(predicate(self))

        await wait_for(holds, timeout, what)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@contextlib.asynccontextmanager
async def watching(url: str, selectors: list[str]) -> AsyncIterator[Socket]:
    async with open_ws(url) as ws:
        assert (await subscribe(ws, 1, selectors))[-1] == {"type": "ack", "id": 1}
        socket = Socket(ws)
        try:
            yield socket
        finally:
            await socket.close()


async def add_tenant(db: asyncpg.Connection[Any], name: str, max_devices: int | None = None) -> uuid.UUID:
    tenant_id: uuid.UUID = await db.fetchval(
        "INSERT INTO tenants (name, max_devices) VALUES ($1, $2) RETURNING id", name, max_devices
    )
    return tenant_id


def rejects(base: str, headers: dict[str, str]) -> list[tuple[str | None, str]]:
    response = httpx.get(f"{base}/api/v1/ingest/rejects", headers=headers, params={"limit": 100}, timeout=10)
    assert response.status_code == 200, response.text
    return sorted((r["device_id"], r["reason"]) for r in response.json()["items"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_each_tenant_sees_its_own_devices_events_alerts_and_dead_letters(
    service: Start, database_url: str, redis_url: str, db: asyncpg.Connection[Any], broker: str, unique: str
) -> None:
    acme = await add_tenant(db, f"acme-{unique}")
    globex = await add_tenant(db, f"globex-{unique}", max_devices=2)
    a1, a2, g1 = f"a1-{unique}", f"a2-{unique}", f"g1-{unique}"
    g_new, g_extra = f"g-new-{unique}", f"g-extra-{unique}"
    await db.executemany(
        "INSERT INTO devices (id, type, tenant_id) VALUES ($1, $2, $3)",
        [(a1, "thermo", acme), (a2, "generic", acme), (g1, "thermo", globex)],
    )
    # A rule of acme on every thermometer: globex's thermometer is not acme's business.
    await db.execute(
        "INSERT INTO alert_rules (tenant_id, name, device_type, metric, op, threshold)"
        " VALUES ($1, 'hot', 'thermo', 'temperature', '>', 30)",
        acme,
    )
    prefix = f"tn{unique}"
    ingest = Ingest(service, database_url, redis_url, broker, f"ingest-{unique}")
    ingest.start(
        f"ingest-{unique}",
        IOT_REDIS_PREFIX=prefix,
        IOT_INGEST_AUTO_REGISTER="true",
        IOT_INGEST_AUTO_REGISTER_TENANT=f"GLOBEX-{unique}",  # names are matched without regard to case
    )
    realtime: Realtime = start_realtime(service, database_url, redis_url, {"IOT_REDIS_PREFIX": prefix})
    api_port = free_port()
    api: ServiceProcess = service(
        "iot-api",
        api_env(database_url, redis_url, api_port, prefix),
    )
    api_base = f"http://127.0.0.1:{api_port}"
    api.wait_http(f"{api_base}/readyz")
    acme_token = user_token(SECRET, f"alice-{unique}", tenant_id=acme)
    globex_token = user_token(SECRET, f"bob-{unique}", tenant_id=globex)

    # Another tenant's device is answered exactly like a device that does not exist.
    async with open_ws(realtime.url(acme_token)) as ws:
        assert await subscribe(ws, 1, [g1]) == [
            {
                "type": "error",
                "id": 1,
                "code": "unknown_device",
                "message": f"1 unknown device(s): {g1}",
                "devices": [g1],
            }
        ]
        ghost = f"ghost-{unique}"
        refused = (await subscribe(ws, 2, [ghost]))[0]
        assert (refused["code"], refused["devices"]) == ("unknown_device", [ghost])

    async with (
        watching(realtime.url(acme_token), ["*"]) as acme_ws,
        watching(realtime.url(globex_token), ["*"]) as globex_ws,
    ):
        await send(broker, g1, reading(35.0))  # hot, of the rule's type, in the other tenant
        await send(broker, a1, reading(20.0), reading(35.0))
        await send(broker, a2, reading(21.0), b'{"temperature": null}')
        await send(broker, g1, b"{not json")
        await send(broker, g_new, reading(22.0))  # auto-registered into globex (its 2nd device)
        await send(broker, g_extra, reading(23.0))  # past globex's max_devices: refused
        await send(broker, "bad%id", reading(24.0))  # no device: a dead letter of no tenant
        await acme_ws.wait("acme's alert", lambda s: s.events("alert"))
        # Markers, published last: once each is seen, every earlier event has reached its socket.
        await send(broker, a2, reading(1.0, metric="marker"))
        await send(broker, g1, reading(1.0, metric="marker"))
        for socket in (acme_ws, globex_ws):
            await socket.wait("the marker", lambda s: any("marker" in f.get("metrics", {}) for f in s.frames))

        assert acme_ws.devices() == {a1, a2}
        assert globex_ws.devices() == {g1, g_new}
        [alert] = acme_ws.events("alert")
        assert (alert["device_id"], alert["state"], alert["value"]) == (a1, "open", 35.0)
        assert globex_ws.events("alert") == []
        acme_values = [f["metrics"].get("temperature") for f in acme_ws.events("telemetry")]
        assert acme_values == [20.0, 35.0, 21.0, None]
        assert [f["metrics"].get("temperature") for f in globex_ws.events("telemetry")] == [35.0, 22.0, None]

    alerts = await db.fetch("SELECT device_id, tenant_id FROM alerts")
    assert [tuple(r) for r in alerts] == [(a1, acme)]
    assert await db.fetchval("SELECT tenant_id FROM devices WHERE id = $1", g_new) == globex
    assert await db.fetchval("SELECT count(*) FROM devices WHERE id = $1", g_extra) == 0

    # Dead letters, through the API: each tenant lists its own; a platform admin (the bootstrap key, in
    # the default tenant) lists those of no known device, and none of the tenants'.
    expected = {
        "acme": [(a2, "invalid_value")],
        "globex": sorted([(g1, "malformed_json"), (g_extra, "tenant_quota")]),
        "platform": [(None, "invalid_topic")],
    }

    async def all_listed() -> bool:
        return len(await db.fetch("SELECT 1 FROM ingest_rejects")) == 4

    await wait_for(all_listed, 30, "the four dead letters")
    assert rejects(api_base, bearer(acme_token)) == expected["acme"]
    assert rejects(api_base, bearer(globex_token)) == expected["globex"]
    assert rejects(api_base, AUTH) == expected["platform"]
    detail = await db.fetchval("SELECT detail FROM ingest_rejects WHERE device_id = $1", g_extra)
    assert detail == f"device not registered: tenant 'globex-{unique}' has reached its limit of 2 devices"


async def test_a_platform_admin_watches_the_default_tenant_unless_it_names_another(
    service: Start, database_url: str, redis_url: str, db: asyncpg.Connection[Any], unique: str
) -> None:
    acme = await add_tenant(db, f"acme-{unique}")
    mine, theirs = f"default-{unique}", f"acme-{unique}"
    await db.execute("INSERT INTO devices (id) VALUES ($1)", mine)
    await db.execute("INSERT INTO devices (id, tenant_id) VALUES ($1, $2)", theirs, acme)
    realtime = start_realtime(service, database_url, redis_url)
    admin = issue_token(
        SECRET, user_principal(uuid.uuid4(), DEFAULT_TENANT_ID, "admin", platform_admin=True), 60
    )
    async with open_ws(realtime.url(admin)) as ws:
        assert (await subscribe(ws, 1, [mine]))[-1] == {"type": "ack", "id": 1}
        assert (await subscribe(ws, 2, [theirs]))[-1]["code"] == "unknown_device"
    async with open_ws(f"{realtime.url(admin)}&tenant={acme}") as ws:
        assert (await subscribe(ws, 1, [theirs]))[-1] == {"type": "ack", "id": 1}
        assert (await subscribe(ws, 2, [mine]))[-1]["code"] == "unknown_device"
    # A tenant's own user cannot pick another tenant.
    async with open_ws(
        f"{realtime.url(user_token(SECRET, tenant_id=acme))}&tenant={DEFAULT_TENANT_ID}"
    ) as ws:
        await ws.wait_closed()
        assert ws.close_code == 4003
        assert ws.close_reason == "only a platform admin may choose another tenant"
