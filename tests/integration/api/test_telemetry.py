"""Telemetry history, aggregates over raw rows and the hourly rollup, latest values, dead letters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient

from iot_api.rollup import roll_up
from iot_common.db import connect
from iot_common.messages import LatestValue, Reading
from iot_common.topics import RedisNames
from iot_ingest.telemetry import insert_telemetry
from tests.integration.api.test_devices import assert_problem

Client = AsyncTestClient[Any]
HOUR0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)


async def seed(database_url: str, device_id: str, seconds: int, step: int = 10) -> list[Reading]:
    """Readings every ``step`` seconds from HOUR0: temp = i, hum = 2 i, plus a text state each minute."""
    readings = []
    for i in range(0, seconds, step):
        metrics: dict[str, float | str] = {"temp": float(i), "hum": 2.0 * i}
        if i % 60 == 0:
            metrics["state"] = "ok"
        readings.append(Reading(device_id=device_id, ts=HOUR0 + timedelta(seconds=i), metrics=metrics))
    conn = await connect(database_url)
    try:
        await insert_telemetry(conn, readings)
    finally:
        await conn.close()
    return readings


async def make_device(client: Client, headers: dict[str, str], device_id: str) -> None:
    response = await client.post("/api/v1/devices", json={"id": device_id}, headers=headers)
    assert response.status_code == 201


def iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


async def test_raw_points_paginate_both_orders(
    client: Client, writer: dict[str, str], unique: str, database_url: str
) -> None:
    device_id = f"t-{unique}"
    await make_device(client, writer, device_id)
    await seed(database_url, device_id, 600)  # 60 instants x 2 metrics + 10 states = 130 points
    for order in ("desc", "asc"):
        points: list[tuple[str, str]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 17, "order": order}
            if cursor:
                params["cursor"] = cursor
            response = await client.get(
                f"/api/v1/devices/{device_id}/telemetry", params=params, headers=writer
            )
            assert response.status_code == 200, response.text
            page = response.json()
            assert page["kind"] == "raw"
            points.extend((p["ts"], p["metric"]) for p in page["items"])
            if not page["has_more"]:
                break
            cursor = page["next_cursor"]
        assert len(points) == 130
        assert len(set(points)) == 130
        assert points == sorted(points, reverse=order == "desc")

    one = await client.get(
        f"/api/v1/devices/{device_id}/telemetry",
        params={
            "metric": "state",
            "from": iso(HOUR0 + timedelta(seconds=60)),
            "to": iso(HOUR0 + timedelta(seconds=300)),
            "order": "asc",
        },
        headers=writer,
    )
    body = one.json()
    assert [p["value"] for p in body["items"]] == ["ok"] * 4
    assert body["items"][0]["ts"] == iso(HOUR0 + timedelta(seconds=60))
    assert body["has_more"] is False
    several = await client.get(
        f"/api/v1/devices/{device_id}/telemetry",
        params=[("metric", "temp"), ("metric", "hum"), ("limit", 4)],
        headers=writer,
    )
    assert {p["metric"] for p in several.json()["items"]} == {"temp", "hum"}
    assert several.json()["items"][0]["value"] in (590.0, 1180.0)


async def test_aggregates_on_raw_rows_and_on_the_rollup_agree(
    client: Client, writer: dict[str, str], unique: str, database_url: str
) -> None:
    device_id = f"a-{unique}"
    await make_device(client, writer, device_id)
    readings = await seed(database_url, device_id, 3 * 3600)
    start, end = HOUR0 + timedelta(minutes=30), HOUR0 + timedelta(hours=3)
    params = {
        "metric": "temp",
        "bucket": "1h",
        "agg": "avg,min,max,sum,count",
        "from": iso(start),
        "to": iso(end),
    }

    def expected() -> list[dict[str, Any]]:
        result = []
        for h in range(3):
            values = [
                float(r.metrics["temp"])
                for r in readings
                if max(start, HOUR0 + timedelta(hours=h)) <= r.ts < HOUR0 + timedelta(hours=h + 1)
            ]
            result.append(
                {
                    "ts": iso(HOUR0 + timedelta(hours=h)),
                    "avg": sum(values) / len(values),
                    "min": min(values),
                    "max": max(values),
                    "sum": sum(values),
                    "count": len(values),
                }
            )
        return result

    before = (
        await client.get(f"/api/v1/devices/{device_id}/telemetry", params=params, headers=writer)
    ).json()
    assert before["kind"] == "aggregate"
    assert before["points"] == expected()

    conn = await connect(database_url)
    try:
        until = await roll_up(conn, lag=timedelta(0))
        assert until is not None
        assert until > HOUR0 + timedelta(hours=3)
        assert (
            await conn.fetchval("SELECT count(*) FROM telemetry_hourly WHERE device_id = $1", device_id) == 6
        )
        # Change a raw value inside a rolled-up hour: the answer must now come from the rollup, unchanged.
        await conn.execute(
            "UPDATE telemetry SET value = 1e9 WHERE device_id = $1 AND metric = 'temp' AND ts = $2",
            device_id,
            HOUR0 + timedelta(hours=1, minutes=10),
        )
    finally:
        await conn.close()
    after = (await client.get(f"/api/v1/devices/{device_id}/telemetry", params=params, headers=writer)).json()
    assert after["points"] == expected()

    minutes = await client.get(
        f"/api/v1/devices/{device_id}/telemetry",
        params={
            "metric": "hum",
            "bucket": "5m",
            "agg": "max,count",
            "from": iso(HOUR0),
            "to": iso(HOUR0 + timedelta(minutes=15)),
        },
        headers=writer,
    )
    assert minutes.json()["points"] == [
        {"ts": iso(HOUR0), "max": 580.0, "count": 30},
        {"ts": iso(HOUR0 + timedelta(minutes=5)), "max": 1180.0, "count": 30},
        {"ts": iso(HOUR0 + timedelta(minutes=10)), "max": 1780.0, "count": 30},
    ]
    day = await client.get(
        f"/api/v1/devices/{device_id}/telemetry",
        params={
            "metric": "temp",
            "bucket": "1d",
            "agg": "count",
            "from": iso(HOUR0 - timedelta(days=1)),
            "to": iso(HOUR0 + timedelta(days=1)),
        },
        headers=writer,
    )
    assert sum(p["count"] for p in day.json()["points"]) == len(readings)


async def test_telemetry_errors(client: Client, writer: dict[str, str], unique: str) -> None:
    device_id = f"e-{unique}"
    await make_device(client, writer, device_id)
    url = f"/api/v1/devices/{device_id}/telemetry"
    assert_problem(await client.get(f"/api/v1/devices/nope-{unique}/telemetry", headers=writer), 404)
    assert_problem(await client.get(url, params={"bucket": "1h"}, headers=writer), 422, "metric")
    assert_problem(
        await client.get(url, params={"bucket": "3h", "metric": "t"}, headers=writer), 422, "bucket"
    )
    assert_problem(
        await client.get(url, params={"bucket": "1h", "metric": "t", "agg": "median"}, headers=writer),
        422,
        "agg",
    )
    assert_problem(
        await client.get(
            url, params={"bucket": "1m", "metric": "t", "from": "2020-01-01T00:00:00Z"}, headers=writer
        ),
        422,
        "bucket",
    )
    assert_problem(
        await client.get(
            url,
            params={
                "bucket": "1h",
                "metric": "t",
                "from": "2030-01-01T00:00:00Z",
                "to": "2029-01-01T00:00:00Z",
            },
            headers=writer,
        ),
        422,
        "from",
    )
    assert_problem(await client.get(url, params={"from": "yesterday"}, headers=writer), 422, "from")
    assert_problem(await client.get(url, params={"metric": "9bad"}, headers=writer), 422, "metric")
    assert_problem(await client.get(url, params={"cursor": "eyJ4Ijox"}, headers=writer), 422, "cursor")
    assert_problem(await client.get(url, params={"limit": 10001}, headers=writer), 422, "limit")


async def test_latest_from_redis_then_database(
    client: Client,
    writer: dict[str, str],
    unique: str,
    database_url: str,
    redis: aioredis.Redis,
    redis_names: RedisNames,
) -> None:
    device_id = f"l-{unique}"
    other = f"l2-{unique}"
    await make_device(client, writer, device_id)
    await make_device(client, writer, other)
    await seed(database_url, device_id, 120)
    from_db = (await client.get(f"/api/v1/devices/{device_id}/latest", headers=writer)).json()
    assert from_db["source"] == "database"
    last = iso(HOUR0 + timedelta(seconds=110))
    assert from_db["metrics"] == {
        "hum": {"value": 220.0, "ts": last},
        "state": {"value": "ok", "ts": iso(HOUR0 + timedelta(seconds=60))},
        "temp": {"value": 110.0, "ts": last},
    }
    now = datetime.now(UTC)
    await redis.hset(
        redis_names.latest_key(device_id), "temp", msgspec.json.encode(LatestValue(value=42.5, ts=now))
    )
    try:
        cached = (await client.get(f"/api/v1/devices/{device_id}/latest", headers=writer)).json()
        assert cached["source"] == "cache"
        assert cached["metrics"] == {"temp": {"value": 42.5, "ts": iso(now)}}
        many = await client.get(
            "/api/v1/telemetry/latest",
            params=[("device_id", device_id), ("device_id", other)],
            headers=writer,
        )
        items = many.json()["items"]
        assert [(i["device_id"], i["source"]) for i in items] == [(device_id, "cache"), (other, "database")]
        assert items[1]["metrics"] == {}
    finally:
        await redis.delete(redis_names.latest_key(device_id))
    assert_problem(await client.get(f"/api/v1/devices/x-{unique}/latest", headers=writer), 404)
    assert_problem(await client.get("/api/v1/telemetry/latest", headers=writer), 422, "device_id")


async def test_multi_device_history(
    client: Client, writer: dict[str, str], unique: str, database_url: str
) -> None:
    ids = [f"h{i}-{unique}" for i in range(3)]
    for device_id in ids:
        await make_device(client, writer, device_id)
    await seed(database_url, ids[0], 600)
    await seed(database_url, ids[1], 300)
    params = [("device_id", d) for d in ids] + [
        ("metric", "temp"),
        ("from", iso(HOUR0)),
        ("to", iso(HOUR0 + timedelta(hours=1))),
    ]
    raw = (
        await client.get("/api/v1/telemetry/history", params=[*params, ("limit", 40)], headers=writer)
    ).json()
    assert [s["device_id"] for s in raw["series"]] == ids
    assert [len(s["points"]) for s in raw["series"]] == [40, 30, 0]
    assert [s["has_more"] for s in raw["series"]] == [True, False, False]
    assert raw["series"][0]["points"][0] == {"ts": iso(HOUR0), "value": 0.0}
    bucketed = await client.get(
        "/api/v1/telemetry/history", params=[*params, ("bucket", "5m"), ("agg", "avg,count")], headers=writer
    )
    series = bucketed.json()["series"]
    assert series[0]["points"] == [
        {"ts": iso(HOUR0), "avg": 145.0, "count": 30},
        {"ts": iso(HOUR0 + timedelta(minutes=5)), "avg": 445.0, "count": 30},
    ]
    assert series[1]["points"] == [{"ts": iso(HOUR0), "avg": 145.0, "count": 30}]
    assert series[2]["points"] == []
    assert_problem(
        await client.get("/api/v1/telemetry/history", params=[("device_id", ids[0])], headers=writer),
        422,
        "metric",
    )


async def test_ingest_rejects_filter_and_paginate(
    client: Client, writer: dict[str, str], unique: str, database_url: str
) -> None:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(database_url)
    try:
        # Dead letters of the caller's tenant's devices (those of no known device are the platform's).
        await conn.execute("INSERT INTO devices (id) VALUES ($1), ($2)", f"r-{unique}", f"q-{unique}")
        for i in range(5):
            await conn.execute(
                "INSERT INTO ingest_rejects"
                " (topic, device_id, reason, detail, payload, payload_size, received_at)"
                " VALUES ($1, $2, $3, 'x', '{}', 2, now() - make_interval(secs => $4))",
                f"devices/telemetry/r-{unique}",
                f"r-{unique}" if i < 3 else f"q-{unique}",
                "invalid_json" if i % 2 else "unknown_device",
                float(i),
            )
    finally:
        await conn.close()
    everything = (await client.get("/api/v1/ingest/rejects", headers=writer)).json()
    assert len(everything["items"]) == 5
    assert everything["items"][0]["received_at"] > everything["items"][-1]["received_at"]
    by_device = (
        await client.get("/api/v1/ingest/rejects", params={"device_id": f"r-{unique}"}, headers=writer)
    ).json()
    assert len(by_device["items"]) == 3
    by_reason = (
        await client.get("/api/v1/ingest/rejects", params={"reason": "invalid_json"}, headers=writer)
    ).json()
    assert len(by_reason["items"]) == 2
    page = (await client.get("/api/v1/ingest/rejects", params={"limit": 2}, headers=writer)).json()
    ids = [r["id"] for r in page["items"]]
    while page["has_more"]:
        page = (
            await client.get(
                "/api/v1/ingest/rejects", params={"limit": 2, "cursor": page["next_cursor"]}, headers=writer
            )
        ).json()
        ids.extend(r["id"] for r in page["items"])
    assert ids == [r["id"] for r in everything["items"]]
    assert_problem(
        await client.get("/api/v1/ingest/rejects", params={"limit": 0}, headers=writer), 422, "limit"
    )
