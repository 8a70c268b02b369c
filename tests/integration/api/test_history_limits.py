"""Bounded work per request: a cap on the points of a whole history response with honest paging, and a
bound on the telemetry reads one credential runs at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import msgspec
import uvicorn
from litestar.testing import AsyncTestClient

from iot_api.app import create_app
from iot_api.settings import ApiSettings
from iot_testkit.processes import free_port
from iot_testkit.waiting import wait_for
from tests.integration.api.conftest import ClientFactory, make_key
from tests.integration.api.test_telemetry import HOUR0, iso, make_device, seed

Client = AsyncTestClient[Any]
HISTORY = "/api/v1/telemetry/history"
CAP = 100


async def _devices(client: Client, headers: dict[str, str], database_url: str, unique: str) -> dict[str, Any]:
    """Five devices with 0, 37, 100, 130 and 300 temperature points; what each holds, oldest first."""
    expected: dict[str, Any] = {}
    for n, points in enumerate((0, 37, 100, 130, 300)):
        device_id = f"h{n}-{unique}"
        await make_device(client, headers, device_id)
        readings = await seed(database_url, device_id, points * 10) if points else []
        expected[device_id] = [(iso(r.ts), r.metrics["temp"]) for r in readings]
    return expected


async def _walk(
    client: Client, headers: dict[str, str], params: list[tuple[str, Any]]
) -> list[dict[str, Any]]:
    pages: list[dict[str, Any]] = []
    cursor = None
    while True:
        extra = [("cursor", cursor)] if cursor else []
        response = await client.get(HISTORY, params=[*params, *extra], headers=headers)
        assert response.status_code == 200, response.text
        pages.append(response.json())
        cursor = pages[-1]["next_cursor"]
        assert pages[-1]["truncated"] is (cursor is not None)
        if cursor is None:
            return pages
        assert len(pages) < 50, "the cursor does not advance"


def _joined(pages: list[dict[str, Any]], key: str = "value") -> dict[str, list[tuple[str, Any]]]:
    joined: dict[str, list[tuple[str, Any]]] = {}
    for page in pages:
        for series in page["series"]:
            joined.setdefault(series["device_id"], []).extend((p["ts"], p[key]) for p in series["points"])
    return joined


async def test_history_pages_hold_at_most_the_cap_and_lose_or_repeat_no_point(
    make_client: ClientFactory, admin: dict[str, str], unique: str, database_url: str
) -> None:
    client = await make_client(api_max_points_per_response=CAP)
    expected = await _devices(client, admin, database_url, unique)
    base = [("device_id", d) for d in expected] + [
        ("metric", "temp"),
        ("from", iso(HOUR0)),
        ("to", iso(HOUR0 + timedelta(hours=2))),
    ]
    pages = await _walk(client, admin, [*base, ("limit", 10_000)])
    assert all(sum(len(s["points"]) for s in page["series"]) <= CAP for page in pages)
    assert sum(len(s["points"]) for s in pages[0]["series"]) == CAP
    assert len(pages) == 6  # 567 points, 100 a page
    assert _joined(pages) == {d: points for d, points in expected.items()}
    # Every page is on the first page's range.
    assert {(p["from"], p["to"]) for p in pages} == {(iso(HOUR0), iso(HOUR0 + timedelta(hours=2)))}

    # The per-device limit still holds across pages: at most 120 points of each device.
    limited = _joined(await _walk(client, admin, [*base, ("limit", 120)]))
    assert limited == {d: points[:120] for d, points in expected.items()}

    # Buckets count as points too: 1-minute buckets of 6 points each.
    bucketed = await _walk(client, admin, [*base, ("bucket", "1m"), ("agg", "count")])
    assert all(sum(len(s["points"]) for s in page["series"]) <= CAP for page in bucketed)
    counts = _joined(bucketed, "count")
    assert {d: sum(c for _, c in buckets) for d, buckets in counts.items()} == {
        d: len(points) for d, points in expected.items()
    }
    assert all(len({ts for ts, _ in buckets}) == len(buckets) for buckets in counts.values())


async def test_a_history_cursor_belongs_to_its_query(
    make_client: ClientFactory, admin: dict[str, str], unique: str, database_url: str
) -> None:
    client = await make_client(api_max_points_per_response=CAP)
    expected = await _devices(client, admin, database_url, unique)
    base = [("device_id", d) for d in expected] + [("metric", "temp"), ("from", iso(HOUR0))]
    first = (await client.get(HISTORY, params=base, headers=admin)).json()
    assert first["truncated"]
    other = [("device_id", d) for d in list(expected)[1:]] + [("metric", "temp")]
    response = await client.get(HISTORY, params=[*other, ("cursor", first["next_cursor"])], headers=admin)
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == ["cursor"]


async def _waiting_on_lock(conn: asyncpg.Connection[Any], count: int) -> None:
    """Poll until ``count`` queries of this database wait on a lock (the reads under test).

    ``pg_stat_activity`` is read once per transaction, so ``conn`` must not be in one.
    """
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )

    async def waiting() -> bool:
        return bool(await conn.fetchval(query) >= count)

    await wait_for(waiting, 30, f"{count} queries waiting on a lock", interval=0.05)


@contextlib.asynccontextmanager
async def _served(settings: ApiSettings) -> AsyncIterator[httpx.AsyncClient]:
    """The app under uvicorn on a free port (the test client runs one request at a time)."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    task = asyncio.create_task(server.serve())
    try:
        # uvicorn offers no event to await.
        await wait_for(lambda: server.started, 30, "uvicorn to start", interval=0.05)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield http
    finally:
        server.should_exit = True
        await task


async def test_one_credential_runs_a_bounded_number_of_telemetry_reads_at_once(
    api_settings: ApiSettings, client: Client, admin: dict[str, str], unique: str, database_url: str
) -> None:
    device_id = f"busy-{unique}"
    await make_device(client, admin, device_id)
    await seed(database_url, device_id, 100)
    reader = await make_key(client, admin, "read")
    other = await make_key(client, admin, "read")
    params = {"device_id": device_id, "metric": "temp", "from": iso(HOUR0)}
    settings = msgspec.structs.replace(api_settings, api_max_heavy_reads_per_principal=2)
    blocker: asyncpg.Connection[Any] = await asyncpg.connect(database_url)
    watcher: asyncpg.Connection[Any] = await asyncpg.connect(database_url)
    async with _served(settings) as http:
        try:
            # Hold the telemetry table, so that reads wait in PostgreSQL while we count them.
            lock = blocker.transaction()
            await lock.start()
            await blocker.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")
            slow = [asyncio.create_task(http.get(HISTORY, params=params, headers=reader)) for _ in range(2)]
            await _waiting_on_lock(watcher, 2)
            refused = await http.get(HISTORY, params=params, headers=reader)
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"] == "1"
            raw = await http.get(f"/api/v1/devices/{device_id}/telemetry", headers=reader)
            assert raw.status_code == 429
            # Another credential is not held back by this one: its read gets to the database too.
            elsewhere = asyncio.create_task(http.get(HISTORY, params=params, headers=other))
            await _waiting_on_lock(watcher, 3)
            await lock.rollback()
            assert [r.status_code for r in await asyncio.gather(*slow, elsewhere)] == [200, 200, 200]
        finally:
            await blocker.close()
            await watcher.close()
        # Once they are done, the credential reads again.
        assert (await http.get(HISTORY, params=params, headers=reader)).status_code == 200
