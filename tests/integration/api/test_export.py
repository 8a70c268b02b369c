"""Telemetry export (``GET /api/v1/telemetry/export``) against the real database: CSV and NDJSON, gzip,
buckets, parameters refused by name, one export at a time per credential."""

from __future__ import annotations

import csv
import gzip
import io
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import msgspec
from litestar.testing import AsyncTestClient

from tests.integration.api.test_devices import assert_problem
from tests.integration.api.test_telemetry import HOUR0, iso, make_device, seed

Client = AsyncTestClient[Any]
URL = "/api/v1/telemetry/export"


def window(hours: int = 2) -> dict[str, str]:
    return {"from": iso(HOUR0), "to": iso(HOUR0 + timedelta(hours=hours))}


async def test_csv_has_every_point_in_time_order(
    client: Client, writer: dict[str, str], unique: str, database_url: str
) -> None:
    device_id = f"x-{unique}"
    await make_device(client, writer, device_id)
    await seed(database_url, device_id, 3600)  # temp every 10 s: 360 points; state each minute: 60
    response = await client.get(
        URL,
        params={"device_id": device_id, "metric": "temp", **window()},
        headers={**writer, "Accept-Encoding": "identity"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert "content-encoding" not in response.headers
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == 360
    assert rows[0] == {"ts": iso(HOUR0), "device_id": device_id, "metric": "temp", "value": "0"}
    assert [float(r["value"]) for r in rows] == [float(i) for i in range(0, 3600, 10)]
    text = await client.get(
        URL, params={"device_id": device_id, "metric": "state", **window()}, headers=writer
    )
    states = list(csv.DictReader(io.StringIO(text.text)))
    assert len(states) == 60
    assert {s["value"] for s in states} == {"ok"}


async def test_ndjson_gzip_when_asked(
    client: Client, writer: dict[str, str], unique: str, database_url: str
) -> None:
    device_id = f"x-{unique}"
    await make_device(client, writer, device_id)
    await seed(database_url, device_id, 600)
    params = {"device_id": device_id, "metric": "hum", "format": "ndjson", **window()}
    response = await client.get(URL, params=params, headers={**writer, "Accept-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = response.text.splitlines()  # httpx decoded the gzip body: it was valid gzip
    points = [msgspec.json.decode(line) for line in lines]
    assert len(points) == 60
    assert points[1] == {
        "ts": iso(HOUR0 + timedelta(seconds=10)),
        "device_id": device_id,
        "metric": "hum",
        "value": 20.0,
    }
    plain = await client.get(URL, params=params, headers={**writer, "Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert plain.text.splitlines() == lines


async def test_buckets_as_in_history(
    client: Client, writer: dict[str, str], unique: str, database_url: str
) -> None:
    device_id = f"x-{unique}"
    await make_device(client, writer, device_id)
    await seed(database_url, device_id, 3600)
    params = {"device_id": device_id, "metric": "temp", "bucket": "15m", "agg": "min,max,count", **window()}
    response = await client.get(URL, params=params, headers=writer)
    assert response.status_code == 200, response.text
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert list(rows[0]) == ["ts", "device_id", "metric", "min", "max", "count"]
    assert [(r["min"], r["max"], r["count"]) for r in rows] == [
        (f"{q * 900.0}", f"{q * 900.0 + 890.0}", "90") for q in range(4)
    ]
    history = await client.get(
        "/api/v1/telemetry/history",
        params={
            "device_id": device_id,
            "metric": "temp",
            "bucket": "15m",
            "agg": "min,max,count",
            **window(),
        },
        headers=writer,
    )
    points = history.json()["series"][0]["points"]
    assert [(p["min"], p["max"], p["count"]) for p in points] == [
        (float(r["min"]), float(r["max"]), int(r["count"])) for r in rows
    ]
    nd = await client.get(URL, params={**params, "format": "ndjson"}, headers=writer)
    first = msgspec.json.decode(nd.text.splitlines()[0])
    assert first == {
        "ts": iso(HOUR0),
        "device_id": device_id,
        "metric": "temp",
        "min": 0.0,
        "max": 890.0,
        "count": 90,
    }


async def test_bad_parameters_are_named(client: Client, writer: dict[str, str], unique: str) -> None:
    device_id = f"x-{unique}"
    await make_device(client, writer, device_id)
    base = {"device_id": device_id, "metric": "temp"}
    cases = [
        ({**base, "format": "xml"}, "format"),
        ({**base, "format": "parquet"}, "format"),
        ({**base, "bucket": "3m"}, "bucket"),
        ({**base, "agg": "median"}, "agg"),
        ({**base, "from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "from"),
        ({**base, "from": "2020-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "from"),
        ({"device_id": device_id}, "metric"),
        ({**base, "device_id": "bad id!"}, "device_id"),
    ]
    for params, field in cases:
        response = await client.get(URL, params=params, headers=writer)
        assert_problem(response, 422, field)
    missing = await client.get(URL, params={**base, "device_id": f"nope-{unique}"}, headers=writer)
    assert_problem(missing, 404)


async def test_one_export_at_a_time_per_credential_and_gzip_on_the_wire(
    make_server: Any, writer: dict[str, str], unique: str, database_url: str, client: Client
) -> None:
    """Through a real server: while a large export is being sent (the client reads nothing, so the
    server's writes wait), a second one of the same credential is refused with 429; then gzip bytes."""
    device_id = f"x-{unique}"
    await make_device(client, writer, device_id)
    start, seconds = HOUR0 - timedelta(days=5), 400_000  # ~20 MB of CSV: more than socket buffers hold
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO telemetry (device_id, metric, ts, value)"
            " SELECT $1, 'temp', $2::timestamptz + make_interval(secs => i), i"
            " FROM generate_series(0, $3 - 1) i",
            device_id,
            start,
            seconds,
        )
    finally:
        await conn.close()
    base = await make_server()
    params = {"device_id": device_id, "metric": "temp", "from": iso(start), "to": iso(HOUR0)}
    async with httpx.AsyncClient(base_url=base, headers=writer, timeout=60) as http:
        plain = {"Accept-Encoding": "identity"}  # httpx asks for gzip by default
        async with http.stream("GET", URL, params=params, headers=plain) as first:
            assert first.status_code == 200
            assert "content-encoding" not in first.headers
            second = await http.get(URL, params=params)
            assert second.status_code == 429, second.text
            assert second.headers["retry-after"]
            lines = 0
            async for chunk in first.aiter_raw():
                lines += chunk.count(b"\n")
        assert lines == seconds + 1  # the header and every point
        small = {**params, "to": iso(start + timedelta(hours=1))}
        async with http.stream("GET", URL, params=small, headers={"Accept-Encoding": "gzip"}) as zipped:
            assert zipped.headers["content-encoding"] == "gzip"
            raw = b"".join([chunk async for chunk in zipped.aiter_raw()])
        assert raw[:2] == b"\x1f\x8b"
        rows = list(csv.DictReader(io.StringIO(gzip.decompress(raw).decode())))
        assert len(rows) == 3600
        assert rows[-1]["ts"] == iso(start + timedelta(seconds=3599))
