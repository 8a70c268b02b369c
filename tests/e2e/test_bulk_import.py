"""Bulk provisioning end to end: ``POST /api/v1/devices/import?credentials=true`` on ``iot-api`` provisioning
a Mosquitto with the dynamic security plugin (the shipped configuration); an imported device connects with
the password of the answer's CSV and its reading is stored by ``iot-ingest``, over MQTT and over HTTP. The
100,000-device run, with the API checking credentials itself (EMQX hooks), is ``bench/bench_import.py``."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from iot_common.topics import telemetry_topic
from iot_testkit.processes import Start
from iot_testkit.waiting import wait_for
from tests.e2e.broker_support import shipped_broker, start_platform
from tests.e2e.test_device_identity import REFUSED, connect

BOOTSTRAP_KEY = "iotk_bulkimport01_" + "b" * 24
DEVICES = 500
STREAMED = 201
"""Devices of the streamed import: two batches of broker users (200 a message)."""


@pytest.fixture
def broker() -> Iterator[int]:
    with shipped_broker() as port:
        yield port


async def test_imported_devices_connect_and_publish_with_their_credentials(
    broker: int,
    service: Start,
    database_url: str,
    redis_url: str,
    db: asyncpg.Connection[Any],
    unique: str,
) -> None:
    platform = start_platform(broker, service, database_url, redis_url, f"imp-{unique}", BOOTSTRAP_KEY)
    http = platform.http

    # The streamed answer (Accept: application/x-ndjson) tells each batch of broker users as it is made;
    # a device connects with the password of its line.
    streamed = "id\n" + "".join(f"{unique}-s{i:03d}\n" for i in range(STREAMED))
    response = await http.post(
        "/api/v1/devices/import?credentials=true",
        content=streamed,
        headers={"Content-Type": "text/csv", "Accept": "application/x-ndjson"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line.get("phase") for line in lines[:6]] == [
        "parsed",
        "validated",
        "stored",
        "broker",
        "broker",
        "done",
    ]
    assert [(line["done"], line["total"]) for line in lines[3:5]] == [(200, STREAMED), (STREAMED, STREAMED)]
    assert len(lines) == 6 + STREAMED
    mine = lines[-1]
    device = await connect(broker, mine["username"], mine["password"])
    await device.client.disconnect()

    body = "id,name,type\n" + "".join(f"{unique}-{i:04d},meter {i},meter\n" for i in range(DEVICES))
    response = await http.post(
        "/api/v1/devices/import?credentials=true",
        content=body,
        headers={"Content-Type": "text/csv"},
        timeout=120,
    )
    assert response.status_code == 201, response.text
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == DEVICES
    last = rows[-1]

    with pytest.raises(Exception, match=REFUSED):
        await connect(broker, last["username"], rows[0]["password"])
    device = await connect(broker, last["username"], last["password"])
    now_ms = int(time.time() * 1000)
    device.client.publish(
        telemetry_topic(last["id"]), f'{{"ts": {now_ms}, "metrics": {{"kwh": 1.5}}}}', qos=1
    )

    async def stored() -> bool:
        value = await db.fetchval(
            "SELECT value FROM telemetry WHERE device_id = $1 AND metric = 'kwh'", last["id"]
        )
        return value == 1.5

    await wait_for(stored, 15, "the imported device's reading in the database")
    await device.client.disconnect()

    # The same credential over HTTP ingest (answered after the commit).
    async with httpx.AsyncClient(base_url=platform.ingest_base) as device_http:
        answer = await device_http.post(
            f"/ingest/v1/devices/{last['id']}/telemetry",
            json={"ts": now_ms + 1000, "metrics": {"kwh": 2.5}},
            auth=(last["username"], last["password"]),
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["stored"] == 1
    assert (
        await db.fetchval(
            "SELECT count(*) FROM telemetry WHERE device_id = $1 AND metric = 'kwh' AND value = 2.5",
            last["id"],
        )
        == 1
    )

    # A second import naming one of these ids is refused whole, and creates no broker user either.
    again = await http.post(
        "/api/v1/devices/import?credentials=true",
        content=f"id\n{unique}-new\n{last['id']}\n",
        headers={"Content-Type": "text/csv"},
    )
    assert again.status_code == 422, again.text
    assert again.json()["rows"][0]["reason"] == "already exists"
    with pytest.raises(Exception, match=REFUSED):
        await connect(broker, f"{unique}-new", last["password"])
    await platform.stop()
