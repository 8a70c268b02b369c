"""Request ids, access log, CORS, and a Redis outage that must not fail requests."""

from __future__ import annotations

import signal
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from iot_api import limits
from iot_testkit.processes import private_redis
from tests.integration.api.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, BOOTSTRAP_KEY
from tests.integration.api.test_devices import assert_problem

Client = AsyncTestClient[Any]


async def test_request_id_is_returned_and_generated(client: Client, admin: dict[str, str]) -> None:
    given = await client.get("/api/v1/devices", headers={**admin, "X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    generated = await client.get("/api/v1/devices", headers=admin)
    assert len(generated.headers["x-request-id"]) == 32
    refused = await client.get("/api/v1/devices", headers={**admin, "X-Request-ID": "bad id\twith spaces"})
    assert refused.headers["x-request-id"] != "bad id\twith spaces"
    missing = await client.get("/api/v1/nothing-here", headers={"X-Request-ID": "r-404"})
    assert missing.headers["x-request-id"] == "r-404"
    assert missing.json()["request_id"] == "r-404"


async def test_one_access_line_per_request_without_secrets(client: Client) -> None:
    login = await client.post("/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    token = login.json()["access_token"]
    with capture_logs(processors=[merge_contextvars]) as logs:
        await client.get("/api/v1/devices?q=x", headers={"X-API-Key": BOOTSTRAP_KEY, "X-Request-ID": "log-1"})
        await client.get(
            "/api/v1/devices", headers={"Authorization": f"Bearer {token}", "X-Request-ID": "log-2"}
        )
        await client.get("/api/v1/devices", headers={"X-Request-ID": "log-3"})
    access = [entry for entry in logs if entry["event"] == "request"]
    assert [(e["request_id"], e["status"]) for e in access] == [
        ("log-1", 200),
        ("log-2", 200),
        ("log-3", 401),
    ]
    assert access[0]["principal"].startswith("key:")
    assert access[0]["path"] == "/api/v1/devices"
    assert access[0]["method"] == "GET"
    assert access[0]["duration_ms"] >= 0
    assert access[2]["principal"] is None
    text = repr(logs)
    assert BOOTSTRAP_KEY not in text
    assert token not in text
    assert ADMIN_PASSWORD not in text


async def test_cors_preflight(client: Client) -> None:
    allowed = await client.options(
        "/api/v1/devices",
        headers={
            "Origin": "https://dashboard.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert allowed.status_code in (200, 204)
    assert allowed.headers["access-control-allow-origin"] == "https://dashboard.example.com"
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = await client.options(
        "/api/v1/devices",
        headers={"Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in other.headers
    simple = await client.get(
        "/api/v1/devices", headers={"Origin": "https://dashboard.example.com", "X-API-Key": BOOTSTRAP_KEY}
    )
    assert simple.headers["access-control-allow-origin"] == "https://dashboard.example.com"
    assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()


async def test_redis_outage_degrades_to_the_database(make_client: Any, unique: str) -> None:
    with private_redis() as server:
        client: Client = await make_client(redis_url=server.url)
        admin = {"X-API-Key": BOOTSTRAP_KEY}
        device_id = f"o-{unique}"
        assert (
            await client.post("/api/v1/devices", json={"id": device_id}, headers=admin)
        ).status_code == 201
        assert (await client.get(f"/api/v1/devices/{device_id}", headers=admin)).status_code == 200
        login = await client.post(
            "/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
        )
        refresh_token = login.json()["refresh_token"]
        assert refresh_token

        server.stop(signal.SIGKILL)

        got = await client.get(f"/api/v1/devices/{device_id}", headers=admin)
        assert got.status_code == 200, got.text
        patched = await client.patch(f"/api/v1/devices/{device_id}", json={"name": "n2"}, headers=admin)
        assert patched.status_code == 200
        assert (await client.get(f"/api/v1/devices/{device_id}", headers=admin)).json()["name"] == "n2"
        listed = await client.get("/api/v1/devices", headers=admin)
        assert [d["id"] for d in listed.json()["items"]] == [device_id]
        latest = await client.get(f"/api/v1/devices/{device_id}/latest", headers=admin)
        assert latest.json()["source"] == "database"
        created = await client.post("/api/v1/api-keys", json={"name": "k", "scopes": ["read"]}, headers=admin)
        assert created.status_code == 201
        key = {"X-API-Key": created.json()["key"]}
        assert (await client.get("/api/v1/devices", headers=key)).status_code == 200
        revoked = await client.delete(f"/api/v1/api-keys/{created.json()['id']}", headers=admin)
        assert revoked.status_code == 204
        assert_problem(await client.get("/api/v1/devices", headers=key), 401)

        again = await client.post(
            "/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
        )
        assert again.status_code == 200
        assert again.json()["refresh_token"] is None
        bearer = {"Authorization": f"Bearer {again.json()['access_token']}"}
        assert (await client.get("/api/v1/devices", headers=bearer)).status_code == 200
        assert_problem(await client.post("/api/v1/auth/refresh", json={"refresh_token": refresh_token}), 503)
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"]["redis"] != "ok"


BAD_TOKEN = {"Authorization": "Bearer not-a-jwt"}


async def test_forwarded_for_is_ignored_without_trusted_proxies(
    make_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default no X-Forwarded-For is believed, not even from loopback: a client cannot escape the
    per-address limit of failed credentials by forging one."""
    monkeypatch.setattr(limits, "WINDOW_S", 3600)
    base = await make_server(api_auth_failures_per_minute=2)
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        statuses = [
            (await http.get("/api/v1/devices", headers={**BAD_TOKEN, "X-Forwarded-For": f"203.0.113.{i}"}))
            for i in range(1, 4)
        ]
    assert [r.status_code for r in statuses] == [401, 401, 429]
    assert 1 <= int(statuses[2].headers["Retry-After"]) <= 3600


async def test_clients_behind_a_trusted_proxy_are_limited_separately(
    make_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "WINDOW_S", 3600)
    base = await make_server(api_auth_failures_per_minute=2, trusted_proxies=["127.0.0.0/8"])

    def via_proxy(forwarded_for: str) -> dict[str, str]:
        return {**BAD_TOKEN, "X-Forwarded-For": forwarded_for}

    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        first = [
            (await http.get("/api/v1/devices", headers=via_proxy("198.51.100.1"))).status_code
            for _ in range(3)
        ]
        assert first == [401, 401, 429]
        # Another client behind the same proxy has its own budget.
        assert (await http.get("/api/v1/devices", headers=via_proxy("198.51.100.2"))).status_code == 401
        # The proxy appends the address it saw: a forged entry to its left changes nothing.
        forged = via_proxy("192.0.2.77, 198.51.100.1")
        assert (await http.get("/api/v1/devices", headers=forged)).status_code == 429
