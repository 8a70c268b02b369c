"""The streamed answer of a bulk import (``POST /api/v1/devices/import`` with ``Accept:
application/x-ndjson``) against the real database: one line per phase, the credentials after ``done``, the
refused rows before ``failed`` (nothing stored), lines that arrive while the import still runs, and an
import that ends whether or not its client reads the answer."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import asyncpg
import httpx
from litestar.testing import AsyncTestClient

from iot_testkit.waiting import wait_for
from tests.integration.api.conftest import BOOTSTRAP_KEY
from tests.integration.api.tenants import new_tenant, tenant_key
from tests.integration.api.test_hostile_input import HOSTILE_BYTES

Client = AsyncTestClient[Any]
URL = "/api/v1/devices/import"
STREAM = {"Accept": "application/x-ndjson"}
CSV = {"Content-Type": "text/csv"}


def lines_of(text: str) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = [json.loads(line) for line in text.splitlines()]
    return lines


def phases(lines: list[dict[str, Any]]) -> list[str]:
    return [line["phase"] for line in lines if "phase" in line]


async def test_streamed_import_reports_each_phase_then_the_credentials(
    client: Client, writer: dict[str, str], unique: str, database_url: str
) -> None:
    body = "id,name,type\n" + "".join(f"{unique}-{i},n{i},meter\n" for i in range(3))
    response = await client.post(f"{URL}?credentials=true", content=body, headers={**writer, **CSV, **STREAM})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert response.headers["cache-control"] == "no-store"
    lines = lines_of(response.text)
    assert phases(lines) == ["parsed", "validated", "stored", "done"], lines
    assert lines[:4] == [
        {"phase": "parsed", "rows": 3},
        {"phase": "validated", "rows": 3, "invalid": 0},
        {"phase": "stored", "rows": 3},
        {"phase": "done", "created": 3, "credentials": True},
    ]
    credentials = lines[4:]
    assert [c["id"] for c in credentials] == [f"{unique}-{i}" for i in range(3)]
    assert all(set(c) == {"id", "username", "password"} for c in credentials)
    assert all(c["username"] == c["id"] and c["password"].startswith("iotd_") for c in credentials)
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval(
            "SELECT secret_hash FROM device_credentials WHERE device_id = $1", credentials[1]["id"]
        )
    finally:
        await conn.close()
    assert stored == hashlib.sha256(credentials[1]["password"].encode()).hexdigest()
    device = (await client.get(f"/api/v1/devices/{unique}-2", headers=writer)).json()
    assert (device["name"], device["type"]) == ("n2", "meter")

    # Without credentials: no line after done.
    body = f'{{"id": "{unique}-x"}}\n'
    headers = {**writer, **STREAM, "Content-Type": "application/x-ndjson"}
    response = await client.post(URL, content=body, headers=headers)
    assert lines_of(response.text)[-1] == {"phase": "done", "created": 1, "credentials": False}


async def test_clients_that_do_not_ask_for_the_stream_get_the_plain_answers(
    client: Client, writer: dict[str, str], unique: str
) -> None:
    for accept in ("*/*", "application/json", "text/csv, application/json;q=0.5", "application/x-ndjson;q=0"):
        body = f"id\n{unique}-{len(accept)}\n"
        response = await client.post(URL, content=body, headers={**writer, **CSV, "Accept": accept})
        assert response.status_code == 201, response.text
        assert response.json() == {"imported": 1, "credentials": False}
    response = await client.post(
        f"{URL}?credentials=true", content=f"id\n{unique}-c\n", headers={**writer, **CSV}
    )
    assert response.status_code == 201
    assert response.text.splitlines()[0] == "id,username,password"
    response = await client.post(URL, content="id\nbad id!\n", headers={**writer, **CSV})
    assert response.status_code == 422
    assert response.json()["rows"][0]["field"] == "id"


async def test_a_wrong_row_streams_its_reason_and_nothing_is_stored(
    client: Client, writer: dict[str, str], unique: str
) -> None:
    body = (
        "id,name,type\n"
        f"{unique}-ok,fine,thermo\n"  # line 2
        "bad id!,x,thermo\n"  # line 3
        f"{unique}-c,x\n"  # line 4: too few fields
    )
    response = await client.post(f"{URL}?credentials=true", content=body, headers={**writer, **CSV, **STREAM})
    assert response.status_code == 200, response.text
    lines = lines_of(response.text)
    assert lines[:2] == [{"phase": "parsed", "rows": 3}, {"phase": "validated", "rows": 3, "invalid": 2}]
    assert [(r["line"], r["field"]) for r in lines[2:4]] == [(3, "id"), (4, "row")]
    assert lines[2]["id"] == "bad id!"
    assert "letters" in lines[2]["reason"]
    failed = lines[4]
    assert (failed["phase"], failed["status"]) == ("failed", 422), failed
    assert failed["rows_total"] == 2
    assert "nothing was imported" in failed["detail"]
    assert len(lines) == 5
    assert (await client.get(f"/api/v1/devices/{unique}-ok", headers=writer)).status_code == 404

    # An id taken in the database is found after the rows pass: validated, then the row, then failed.
    taken = f"{unique}-taken"
    assert (await client.post("/api/v1/devices", json={"id": taken}, headers=writer)).status_code == 201
    body = f"id\n{unique}-new\n{taken}\n"
    lines = lines_of((await client.post(URL, content=body, headers={**writer, **CSV, **STREAM})).text)
    assert phases(lines) == ["parsed", "validated", "failed"], lines
    assert lines[2] == {"line": 3, "id": taken, "field": "id", "reason": "already exists"}
    assert (await client.get(f"/api/v1/devices/{unique}-new", headers=writer)).status_code == 404

    # A body that cannot be read at all: the problem is the only line.
    lines = lines_of((await client.post(URL, content="name\nx\n", headers={**writer, **CSV, **STREAM})).text)
    assert [(line["phase"], line["status"]) for line in lines] == [("failed", 422)]
    assert lines[0]["errors"][0]["field"] == "body"


async def test_refusals_known_before_the_stream_starts_are_plain_problems(
    make_client: Any, admin: dict[str, str], unique: str
) -> None:
    client = await make_client(api_import_max_rows=3, api_import_max_bytes=2048)
    response = await client.post(URL, content="id\n" + "x" * 3000, headers={**admin, **CSV, **STREAM})
    assert response.status_code == 413, response.text
    headers = {**admin, **STREAM, "Content-Type": "text/plain"}
    response = await client.post(URL, content="id\nx\n", headers=headers)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "Content-Type"
    # Past the bounds while reading the rows, or past the tenant's limit: a failed line, nothing stored.
    rows = "".join(f"{unique}-{i}\n" for i in range(4))
    lines = lines_of((await client.post(URL, content="id\n" + rows, headers={**admin, **CSV, **STREAM})).text)
    assert lines[-1]["phase"] == "failed"
    assert "more than 3 rows" in lines[-1]["detail"]
    tenant_id = await new_tenant(client, admin, f"t-{unique}", max_devices=2)
    key = await tenant_key(client, admin, tenant_id, "write")
    body = "id\n" + "".join(f"{unique}-t{i}\n" for i in range(3))
    lines = lines_of((await client.post(URL, content=body, headers={**key, **CSV, **STREAM})).text)
    assert phases(lines) == ["parsed", "validated", "failed"]
    assert lines[-1]["status"] == 409
    assert "max_devices" in lines[-1]["detail"]
    assert (await client.get(f"/api/v1/devices/{unique}-t0", headers=key)).status_code == 404


async def test_a_streamed_import_is_audited_once_with_its_outcome(
    client: Client, admin: dict[str, str], unique: str
) -> None:
    body = "id\n" + "".join(f"{unique}-{i}\n" for i in range(3))
    response = await client.post(URL, content=body, headers={**admin, **CSV, **STREAM})
    assert phases(lines_of(response.text))[-1] == "done"
    response = await client.post(URL, content="id\nbad id!\n", headers={**admin, **CSV, **STREAM})
    assert phases(lines_of(response.text))[-1] == "failed"
    events = (await client.get("/api/v1/audit", headers=admin)).json()["items"]
    imports = [e for e in events if e["action"] == "importDevices"]
    assert sorted(e["status"] for e in imports) == [201, 422], events
    assert all(e["path"] == URL for e in imports)


async def test_lines_arrive_while_the_import_runs_and_it_ends_without_its_reader(
    make_server: Any, unique: str, database_url: str
) -> None:
    """Over a real server: with the tenant's row locked by another transaction, the import waits before
    storing, and its first lines are read meanwhile. A client that goes away then does not stop it: the
    import ends (here it commits) and releases the credential's slot."""
    base = await make_server()
    admin = {"X-API-Key": BOOTSTRAP_KEY}
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        response = await http.post("/api/v1/tenants", json={"name": f"t-{unique}"}, headers=admin)
        assert response.status_code == 201, response.text
        tenant_id = response.json()["id"]
        response = await http.post(
            f"/api/v1/tenants/{tenant_id}/api-keys", json={"name": "k", "scopes": ["write"]}, headers=admin
        )
        key = {"X-API-Key": response.json()["key"]}
        lock = await asyncpg.connect(database_url)
        try:
            locked = lock.transaction()
            await locked.start()
            await lock.execute("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE", tenant_id)
            body = "id\n" + "".join(f"{unique}-{i}\n" for i in range(5))
            request = http.build_request("POST", URL, content=body, headers={**key, **CSV, **STREAM})
            first = await http.send(request, stream=True)
            assert first.status_code == 200
            lines = first.aiter_lines()
            assert json.loads(await anext(lines)) == {"phase": "parsed", "rows": 5}
            assert json.loads(await anext(lines)) == {"phase": "validated", "rows": 5, "invalid": 0}

            # Meanwhile the same credential's next import is refused at once, with a plain 429.
            again = await http.post(URL, content=f"id\n{unique}-z\n", headers={**key, **CSV, **STREAM})
            assert again.status_code == 429, again.text
            assert again.headers["Retry-After"] == "5"

            # The client goes away while the import waits for the lock.
            await first.aclose()
            assert await lock.fetchval("SELECT count(*) FROM devices WHERE tenant_id = $1", tenant_id) == 0
            await locked.rollback()
        finally:
            await lock.close()

        async def stored() -> bool:
            response = await http.get(f"/api/v1/devices/{unique}-4", headers=key)
            return response.status_code == 200

        await wait_for(stored, 30, "the import whose client went away to commit")

        async def released() -> bool:
            response = await http.post(URL, content=f"id\n{unique}-z\n", headers={**key, **CSV})
            assert response.status_code in (201, 429), response.text
            return response.status_code == 201

        await wait_for(released, 30, "the credential's import slot to be released")
        # Audited once each with its outcome: the refused one (429) too.
        conn = await asyncpg.connect(database_url)
        try:
            statuses = [
                r["status"]
                for r in await conn.fetch(
                    "SELECT status FROM audit_events WHERE tenant_id = $1 AND action = 'importDevices'",
                    tenant_id,
                )
            ]
        finally:
            await conn.close()
        assert statuses.count(201) == 2, statuses
        assert 429 in statuses, statuses


async def test_hostile_bodies_stream_a_refusal_never_a_server_error(
    client: Client, writer: dict[str, str]
) -> None:
    """The hostile bodies of the API's other routes, sent as NDJSON and as CSV with the stream asked for:
    each ends with a 4xx ``failed`` line (or ``done``), never a 5xx one."""
    bodies = [*HOSTILE_BYTES, b"id\n\x00\n", b'id,name\n"unclosed\n', b"\xef\xbb\xbfid\n" + b"a" * 70 + b"\n"]
    for body in bodies:
        for media in ("application/x-ndjson", "text/csv"):
            response = await client.post(
                URL, content=body, headers={**writer, **STREAM, "Content-Type": media}
            )
            assert response.status_code == 200, (body, media, response.text)
            last = lines_of(response.text)[-1]
            assert last["phase"] in ("done", "failed"), (body, media, last)
            assert last.get("status", 201) < 500, (body, media, last)
