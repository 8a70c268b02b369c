"""History over the rollups: a year at daily resolution after raw retention dropped the data, late
readings changing the answer, and which level serves which bucket."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from litestar.testing import AsyncTestClient

from iot_api.rollup import DAY, floor_to, roll_up
from iot_common.db import connect
from iot_common.db.partitions import maintain_partitions
from iot_common.messages import Reading
from iot_ingest.telemetry import insert_telemetry
from tests.integration.api.test_telemetry import iso, make_device

Client = AsyncTestClient[Any]
LAG = timedelta(minutes=2)


def daily(i: int) -> dict[str, float]:
    """The day ``i`` days ago holds two readings, i at 06:00 and 2 i at 18:00."""
    return {"count": 2, "sum": 3.0 * i, "min": float(i), "max": 2.0 * i}


async def test_a_year_at_daily_resolution_answers_after_raw_retention_dropped_it(
    client: Client, writer: dict[str, str], unique: str, database_url: str
) -> None:
    device_id = f"y-{unique}"
    await make_device(client, writer, device_id)
    today = floor_to(datetime.now(UTC), DAY)
    year = range(365, 0, -1)  # days ago, oldest first
    readings = [
        Reading(device_id, today - timedelta(days=i) + timedelta(hours=h), {"v": float(i * k), "s": "ok"})
        for i in year
        for h, k in ((6, 1), (18, 2))
    ]
    conn = await connect(database_url)
    try:
        # A deployment that kept raw rows 400 days, rolled them up, then cut raw retention to 30 days.
        await maintain_partitions(conn, retention_days=400, ahead_days=7)
        await insert_telemetry(conn, readings)
        assert await roll_up(conn, lag=LAG, retention_days=400) is not None
        created_dropped = await maintain_partitions(conn, retention_days=30, ahead_days=7)
        assert created_dropped is not None
        assert len(created_dropped[1]) >= 365 - 31
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM telemetry WHERE device_id = $1 AND ts < $2",
                device_id,
                today - timedelta(days=31),
            )
            == 0
        )
        # The minute level kept 30 days (IOT_ROLLUP_RETENTION_DAYS_MINUTE), hours and days all of it.
        assert await conn.fetchval(
            "SELECT min(bucket) FROM telemetry_minutely WHERE device_id = $1", device_id
        ) >= today - timedelta(days=31)
        assert (
            await conn.fetchval("SELECT count(*) FROM telemetry_daily WHERE device_id = $1", device_id) == 365
        )
    finally:
        await conn.close()

    params: dict[str, Any] = {
        "device_id": device_id,
        "metric": "v",
        "bucket": "1d",
        "agg": "count,sum,min,max",
        "from": iso(today - timedelta(days=365)),
        "to": iso(today),
    }

    async def history(**changes: Any) -> list[dict[str, Any]]:
        response = await client.get("/api/v1/telemetry/history", params={**params, **changes}, headers=writer)
        assert response.status_code == 200, response.text
        points: list[dict[str, Any]] = response.json()["series"][0]["points"]
        return points

    expected = [{"ts": iso(today - timedelta(days=i)), **daily(i)} for i in year]
    assert await history() == expected
    one = await client.get(
        f"/api/v1/devices/{device_id}/telemetry",
        params={k: v for k, v in params.items() if k != "device_id"},
        headers=writer,
    )
    assert one.json()["points"] == expected

    # 7d buckets (aligned on the epoch: Thursdays) are served by the days too.
    weeks: dict[datetime, dict[str, float]] = {}
    for i in year:
        week = floor_to(today - timedelta(days=i), timedelta(days=7))
        day = daily(i)
        if week not in weeks:
            weeks[week] = dict(day)
        else:
            w = weeks[week]
            w.update(
                count=w["count"] + day["count"],
                sum=w["sum"] + day["sum"],
                min=min(w["min"], day["min"]),
                max=max(w["max"], day["max"]),
            )
    assert await history(bucket="7d") == [{"ts": iso(week), **w} for week, w in sorted(weeks.items())]

    # A late reading for a day already rolled up (its raw partition is still kept) changes the day.
    late_day = today - timedelta(days=10)
    conn = await connect(database_url)
    try:
        await insert_telemetry(conn, [Reading(device_id, late_day + timedelta(hours=12), {"v": 1000.0})])
        await roll_up(conn, lag=LAG, retention_days=30)
        # Which level answers: a marker written into one day's daily row shows in 1d buckets only; 12h
        # buckets of the same day come from the hourly rows.
        marked_day = today - timedelta(days=100)
        await conn.execute(
            "UPDATE telemetry_daily SET max = 1e9 WHERE device_id = $1 AND bucket = $2", device_id, marked_day
        )
    finally:
        await conn.close()
    after = {p["ts"]: p for p in await history()}
    assert after[iso(late_day)] == {
        "ts": iso(late_day),
        "count": 3,
        "sum": 1030.0,
        "min": 10.0,
        "max": 1000.0,
    }
    assert after[iso(marked_day)]["max"] == 1e9
    halves = await history(bucket="12h", **{"from": iso(marked_day), "to": iso(marked_day + DAY)})
    assert halves == [
        {"ts": iso(marked_day), "count": 1, "sum": 100.0, "min": 100.0, "max": 100.0},
        {"ts": iso(marked_day + timedelta(hours=12)), "count": 1, "sum": 200.0, "min": 200.0, "max": 200.0},
    ]
