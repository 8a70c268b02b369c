"""Devices endpoints against the real database and Redis: CRUD, pagination, filters, errors, cache."""

from __future__ import annotations

from typing import Any

import asyncpg
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient

from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_common.topics import is_valid_device_id

Client = AsyncTestClient[Any]


def assert_problem(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"]
    if field is not None:
        assert field in [e["field"] for e in body["errors"]], body
    return body


async def test_create_get_update_delete(client: Client, writer: dict[str, str], unique: str) -> None:
    device_id = f"dev-{unique}"
    created = await client.post(
        "/api/v1/devices",
        json={"id": device_id, "name": "Boiler", "type": "thermo", "attributes": {"room": "b1"}},
        headers=writer,
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["id"] == device_id
    assert body["status"] == "unknown"
    assert body["last_seen"] is None
    assert body["attributes"] == {"room": "b1"}
    # The MQTT credentials are in the creation answer only.
    assert body.pop("mqtt")["username"] == device_id

    got = await client.get(f"/api/v1/devices/{device_id}", headers=writer)
    assert got.json() == body

    patched = await client.patch(
        f"/api/v1/devices/{device_id}", json={"name": "Boiler 2", "status": "online"}, headers=writer
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["name"] == "Boiler 2"
    assert patched.json()["status"] == "online"
    assert patched.json()["type"] == "thermo"

    deleted = await client.delete(f"/api/v1/devices/{device_id}", headers=writer)
    assert deleted.status_code == 204
    assert_problem(await client.get(f"/api/v1/devices/{device_id}", headers=writer), 404)
    assert_problem(await client.delete(f"/api/v1/devices/{device_id}", headers=writer), 404)
    assert_problem(await client.patch(f"/api/v1/devices/{device_id}", json={}, headers=writer), 404)


async def test_generated_id_and_duplicate_is_409(client: Client, writer: dict[str, str]) -> None:
    created = await client.post("/api/v1/devices", json={"name": "anon"}, headers=writer)
    assert created.status_code == 201
    device_id = created.json()["id"]
    assert device_id.startswith("dev-")
    assert is_valid_device_id(device_id)
    again = await client.post("/api/v1/devices", json={"id": device_id}, headers=writer)
    assert_problem(again, 409)


async def test_invalid_input_is_422_naming_the_field(client: Client, writer: dict[str, str]) -> None:
    assert_problem(await client.post("/api/v1/devices", json={"id": "a/b"}, headers=writer), 422, "id")
    assert_problem(await client.post("/api/v1/devices", json={"type": ""}, headers=writer), 422, "type")
    assert_problem(
        await client.post("/api/v1/devices", json={"attributes": {"k": "a\x00b"}}, headers=writer),
        422,
        "attributes.k",
    )
    assert_problem(await client.post("/api/v1/devices", json={"bogus": 1}, headers=writer), 422)
    assert_problem(await client.get("/api/v1/devices?limit=0", headers=writer), 422, "limit")
    assert_problem(await client.get("/api/v1/devices?status=dead", headers=writer), 422, "status")
    assert_problem(await client.get("/api/v1/devices?cursor=nonsense", headers=writer), 422, "cursor")
    malformed = await client.post(
        "/api/v1/devices", content=b"{not json", headers={**writer, "Content-Type": "application/json"}
    )
    assert malformed.status_code in (400, 422)
    assert malformed.headers["content-type"].startswith("application/problem+json")


async def test_body_over_the_limit_is_413(make_client: Any, admin: dict[str, str]) -> None:
    client = await make_client(api_max_body_bytes=2048)
    response = await client.post("/api/v1/devices", json={"attributes": {"blob": "x" * 5000}}, headers=admin)
    assert_problem(response, 413)


async def test_list_paginates_with_cursor_and_filters(
    client: Client, writer: dict[str, str], unique: str
) -> None:
    ids = [f"p{unique}-{i:02d}" for i in range(7)]
    for i, device_id in enumerate(ids):
        response = await client.post(
            "/api/v1/devices",
            json={"id": device_id, "name": f"Pump {i}", "type": "pump" if i % 2 else "valve"},
            headers=writer,
        )
        assert response.status_code == 201
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3, "q": unique}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/api/v1/devices", params=params, headers=writer)).json()
        pages += 1
        seen.extend(d["id"] for d in page["items"])
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert seen == ids
    assert pages == 3

    pumps = (await client.get("/api/v1/devices", params={"type": "pump", "q": unique}, headers=writer)).json()
    assert [d["id"] for d in pumps["items"]] == ids[1::2]
    by_name = (await client.get("/api/v1/devices", params={"q": "PUMP 3"}, headers=writer)).json()
    assert [d["id"] for d in by_name["items"]] == [ids[3]]
    unknown = await client.get("/api/v1/devices", params={"status": "online", "q": unique}, headers=writer)
    assert unknown.json()["items"] == []
    like = (await client.get("/api/v1/devices", params={"q": "%"}, headers=writer)).json()
    assert like["items"] == []

    alias = await client.get("/api/v1/device/list", params={"limit": 3, "q": unique}, headers=writer)
    direct = await client.get("/api/v1/devices", params={"limit": 3, "q": unique}, headers=writer)
    assert alias.json() == direct.json()


async def test_device_reads_are_cached_and_writes_invalidate(
    client: Client,
    writer: dict[str, str],
    unique: str,
    database_url: str,
    redis: aioredis.Redis,
) -> None:
    device_id = f"c-{unique}"
    await client.post("/api/v1/devices", json={"id": device_id, "name": "before"}, headers=writer)
    assert (await client.get(f"/api/v1/devices/{device_id}", headers=writer)).json()["name"] == "before"
    listed = await client.get("/api/v1/devices", params={"q": unique}, headers=writer)
    assert [d["name"] for d in listed.json()["items"]] == ["before"]
    assert await redis.exists(f"iot:test:{unique}:device:{DEFAULT_TENANT_ID.hex}:{device_id}")

    # Changed behind the API's back: the cached answer is served (proving the cache is read) ...
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE devices SET name = 'sneaky' WHERE id = $1", device_id)
    finally:
        await conn.close()
    assert (await client.get(f"/api/v1/devices/{device_id}", headers=writer)).json()["name"] == "before"
    listed = await client.get("/api/v1/devices", params={"q": unique}, headers=writer)
    assert [d["name"] for d in listed.json()["items"]] == ["before"]

    # ... until a write through the API invalidates the device and every cached list page.
    await client.patch(f"/api/v1/devices/{device_id}", json={"type": "t2"}, headers=writer)
    got = (await client.get(f"/api/v1/devices/{device_id}", headers=writer)).json()
    assert (got["name"], got["type"]) == ("sneaky", "t2")
    listed = await client.get("/api/v1/devices", params={"q": unique}, headers=writer)
    assert [d["name"] for d in listed.json()["items"]] == ["sneaky"]

    await client.post("/api/v1/devices", json={"id": f"c-{unique}-2"}, headers=writer)
    listed = await client.get("/api/v1/devices", params={"q": unique}, headers=writer)
    assert len(listed.json()["items"]) == 2
    await client.delete(f"/api/v1/devices/{device_id}", headers=writer)
    assert (await client.get(f"/api/v1/devices/{device_id}", headers=writer)).status_code == 404
    listed = await client.get("/api/v1/devices", params={"q": unique}, headers=writer)
    assert [d["id"] for d in listed.json()["items"]] == [f"c-{unique}-2"]
