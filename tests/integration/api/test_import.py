"""Bulk provisioning (``POST /api/v1/devices/import``) against the real database: CSV and NDJSON, all or
nothing with per-row reasons, credentials shown once, limits."""

from __future__ import annotations

import csv
import hashlib
import io
from typing import Any

import asyncpg
from litestar.testing import AsyncTestClient

from tests.integration.api.tenants import new_tenant, tenant_key

Client = AsyncTestClient[Any]
CSV = {"Content-Type": "text/csv"}
NDJSON = {"Content-Type": "application/x-ndjson"}


def credentials_of(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


async def test_csv_import_with_attribute_columns(client: Client, writer: dict[str, str], unique: str) -> None:
    body = (
        f'id,name,type,attributes.room,floor\n{unique}-a,Boiler,thermo,b1,2\n{unique}-b,"Pump, west",pump,,\n'
    )
    response = await client.post("/api/v1/devices/import", content=body, headers={**writer, **CSV})
    assert response.status_code == 201, response.text
    assert response.json() == {"imported": 2, "credentials": False}
    a = (await client.get(f"/api/v1/devices/{unique}-a", headers=writer)).json()
    assert (a["name"], a["type"], a["attributes"]) == ("Boiler", "thermo", {"room": "b1", "floor": "2"})
    b = (await client.get(f"/api/v1/devices/{unique}-b", headers=writer)).json()
    assert (b["name"], b["type"], b["attributes"]) == ("Pump, west", "pump", {})
    status = await client.get(f"/api/v1/devices/{unique}-a/credentials", headers=writer)
    assert status.json()["active"] is False  # no credentials asked for


async def test_ndjson_import_with_credentials_shown_once(
    client: Client, writer: dict[str, str], unique: str, database_url: str
) -> None:
    lines = [
        f'{{"id": "{unique}-{i}", "name": "n{i}", "type": "meter", "attributes": {{"i": {i}}}}}'
        for i in range(3)
    ]
    body = "\n".join(lines) + "\n\n"
    response = await client.post(
        "/api/v1/devices/import?credentials=true", content=body, headers={**writer, **NDJSON}
    )
    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert response.headers["cache-control"] == "no-store"
    assert response.text.splitlines()[0] == "id,username,password"
    rows = credentials_of(response.text)
    assert [r["id"] for r in rows] == [f"{unique}-{i}" for i in range(3)]
    assert all(r["username"] == r["id"] and r["password"].startswith("iotd_") for r in rows)
    # Only the SHA-256 is stored; the credential answers to the secret (the broker hooks' check).
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval(
            "SELECT secret_hash FROM device_credentials WHERE device_id = $1", rows[0]["id"]
        )
    finally:
        await conn.close()
    assert stored == hashlib.sha256(rows[0]["password"].encode()).hexdigest()
    assert rows[0]["password"] not in stored
    device = (await client.get(f"/api/v1/devices/{unique}-2", headers=writer)).json()
    assert device["attributes"] == {"i": 2}


async def test_a_wrong_row_refuses_the_whole_import_naming_each_row(
    client: Client, writer: dict[str, str], unique: str
) -> None:
    taken = f"{unique}-taken"
    assert (await client.post("/api/v1/devices", json={"id": taken}, headers=writer)).status_code == 201
    body = (
        "id,name,type\n"
        f"{unique}-ok,fine,thermo\n"  # line 2
        "bad id!,x,thermo\n"  # line 3
        f"{unique}-ok,again,thermo\n"  # line 4: repeated id
        f"{unique}-c,x,bad type\n"  # line 5
        f"{unique}-d,x\n"  # line 6: too few fields
        "admin,x,thermo\n"  # line 7: a platform MQTT user
    )
    response = await client.post("/api/v1/devices/import", content=body, headers={**writer, **CSV})
    assert response.status_code == 422, response.text
    problem = response.json()
    reasons = {(r["line"], r["field"]) for r in problem["rows"]}
    assert reasons == {(3, "id"), (4, "id"), (5, "type"), (6, "row"), (7, "id")}, problem
    assert problem["rows_total"] == 5
    assert (await client.get(f"/api/v1/devices/{unique}-ok", headers=writer)).status_code == 404
    # An id taken in the database is found after the rows pass: nothing is stored either.
    body = f"id\n{unique}-new\n{taken}\n"
    response = await client.post("/api/v1/devices/import", content=body, headers={**writer, **CSV})
    assert response.status_code == 422, response.text
    assert response.json()["rows"] == [{"line": 3, "id": taken, "field": "id", "reason": "already exists"}]
    assert (await client.get(f"/api/v1/devices/{unique}-new", headers=writer)).status_code == 404


async def test_ndjson_rows_are_refused_with_their_field(
    client: Client, writer: dict[str, str], unique: str
) -> None:
    body = f'{{"id": "{unique}-1"}}\nnot json\n{{"id": "{unique}-2", "colour": "red"}}\n{{"name": "x"}}\n'
    response = await client.post("/api/v1/devices/import", content=body, headers={**writer, **NDJSON})
    assert response.status_code == 422, response.text
    rows = {r["line"]: r for r in response.json()["rows"]}
    assert set(rows) == {2, 3, 4}
    assert rows[2]["field"] == "row"
    assert "colour" in rows[3]["reason"]
    assert rows[4]["field"] == "id" or "id" in rows[4]["reason"]


async def test_bad_requests_name_what_is_wrong(
    client: Client, writer: dict[str, str], reader: dict[str, str], unique: str
) -> None:
    url = "/api/v1/devices/import"
    response = await client.post(url, content="id\nx\n", headers={**writer, "Content-Type": "text/plain"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "Content-Type"
    response = await client.post(url, content="name\nx\n", headers={**writer, **CSV})
    assert response.status_code == 422
    assert "id" in response.json()["detail"]
    response = await client.post(url, content="id\n", headers={**writer, **CSV})
    assert response.status_code == 422
    assert "no device" in response.json()["detail"]
    # A read-only key may not import.
    response = await client.post(url, content=f"id\n{unique}\n", headers={**reader, **CSV})
    assert response.status_code == 403


async def test_limits_rows_bytes_and_the_tenant_device_limit(
    make_client: Any, admin: dict[str, str], unique: str
) -> None:
    client = await make_client(api_import_max_rows=3, api_import_max_bytes=2048)
    url = "/api/v1/devices/import"
    rows = "".join(f"{unique}-{i}\n" for i in range(4))
    response = await client.post(url, content="id\n" + rows, headers={**admin, **CSV})
    assert response.status_code == 422
    assert "more than 3 rows" in response.json()["detail"]
    response = await client.post(url, content="id\n" + "x" * 3000, headers={**admin, **CSV})
    assert response.status_code == 413, response.text
    tenant_id = await new_tenant(client, admin, f"t-{unique}", max_devices=2)
    key = await tenant_key(client, admin, tenant_id, "write")
    body = "id\n" + "".join(f"{unique}-t{i}\n" for i in range(3))
    response = await client.post(url, content=body, headers={**key, **CSV})
    assert response.status_code == 409
    assert "max_devices" in response.json()["detail"]
    body = "id\n" + "".join(f"{unique}-t{i}\n" for i in range(2))
    assert (await client.post(url, content=body, headers={**key, **CSV})).status_code == 201


async def test_an_import_is_audited_once(client: Client, admin: dict[str, str], unique: str) -> None:
    body = "id\n" + "".join(f"{unique}-{i}\n" for i in range(5))
    response = await client.post("/api/v1/devices/import", content=body, headers={**admin, **CSV})
    assert response.status_code == 201, response.text
    events = (await client.get("/api/v1/audit", headers=admin)).json()["items"]
    imports = [e for e in events if "import" in e.get("target", "") or "import" in e.get("action", "")]
    assert len(imports) == 1, events


async def test_ten_thousand_devices_with_credentials_in_one_request(
    client: Client, writer: dict[str, str], unique: str
) -> None:
    """The full 100,000 run is in bench/bench_import.py (about a minute on a loaded machine)."""
    n = 10_000
    body = "id,type\n" + "".join(f"{unique}-{i:06d},meter\n" for i in range(n))
    response = await client.post(
        "/api/v1/devices/import?credentials=true", content=body, headers={**writer, **CSV}
    )
    assert response.status_code == 201, response.text
    rows = credentials_of(response.text)
    assert len(rows) == n
    assert len({r["password"] for r in rows}) == n
    listed = await client.get(f"/api/v1/devices?q={unique}&limit=1", headers=writer)
    assert listed.status_code == 200
    assert listed.json()["items"][0]["id"] == f"{unique}-000000"
