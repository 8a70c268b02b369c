"""Credentials: JWT and API keys, scopes, revocation, refresh and logout, rate limits, bootstrap."""

from __future__ import annotations

import asyncio
import secrets
import threading
import uuid
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from iot_api import limits
from iot_api.services import auth as auth_service
from iot_common.auth import InvalidCredential, decode_token, issue_token, user_principal
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_testkit.processes import JWT_SECRET
from iot_testkit.tokens import user_token
from tests.integration.api.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, BOOTSTRAP_KEY, make_key
from tests.integration.api.test_devices import assert_problem

Client = AsyncTestClient[Any]
SECRET = JWT_SECRET
SOMEONE = user_principal(uuid.uuid4(), DEFAULT_TENANT_ID, "admin")


async def login(client: Client) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_every_api_route_needs_a_credential(client: Client) -> None:
    for path in ("/api/v1/devices", "/api/v1/device/list", "/api/v1/api-keys", "/api/v1/ingest/rejects"):
        body = assert_problem(await client.get(path), 401)
        assert "credentials required" in body["detail"]
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200
    assert (await client.get("/api/docs/openapi.json")).status_code == 200
    assert (await client.get("/api/docs")).status_code == 200


async def test_bad_credentials_are_401(client: Client) -> None:
    cases = [
        {"X-API-Key": "iotk_short"},
        {"X-API-Key": "iotk_aaaaaaaaaaaa_unknownsecretvalue"},
        {"X-API-Key": BOOTSTRAP_KEY[:-1] + "x"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": "Bearer " + issue_token("x" * 40, SOMEONE, 60)},
        {"Authorization": "Bearer " + issue_token(SECRET, SOMEONE, -10)},
    ]
    for headers in cases:
        response = await client.get("/api/v1/devices", headers=headers)
        assert_problem(response, 401)
        assert "WWW-Authenticate" in response.headers


async def test_login_bearer_and_wrong_password(client: Client) -> None:
    tokens = await login(client)
    assert tokens["token_type"] == "bearer"
    assert tokens["expires_in"] == 900
    principal = decode_token(SECRET, tokens["access_token"])
    assert principal.scopes == frozenset({"admin"})
    me = await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert me.json() == {
        "subject": principal.subject,
        "kind": "user",
        "scopes": ["admin"],
        "tenant_id": str(DEFAULT_TENANT_ID),
        "role": "admin",
        "platform_admin": True,
        "permissions": ["admin", "operate", "read", "write"],
        "tenant_name": "default",
    }
    created = await client.post(
        "/api/v1/devices", json={}, headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert created.status_code == 201

    wrong = await client.post("/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": "nope"})
    assert_problem(wrong, 401)
    unknown = await client.post("/api/v1/auth/login", json={"email": "who@x.y", "password": "nope"})
    assert_problem(unknown, 401)
    assert_problem(await client.post("/api/v1/auth/login", json={"email": ADMIN_EMAIL}), 422, "password")


async def test_refresh_rotates_and_logout_revokes(client: Client) -> None:
    tokens = await login(client)
    refreshed = await client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert refreshed.status_code == 200, refreshed.text
    new = refreshed.json()
    assert new["refresh_token"] != tokens["refresh_token"]
    assert decode_token(SECRET, new["access_token"]).scopes == frozenset({"admin"})
    # The spent refresh token no longer works.
    reuse = await client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert_problem(reuse, 401)

    out = await client.post("/api/v1/auth/logout", json={"refresh_token": new["refresh_token"]})
    assert out.status_code == 204
    after = await client.post("/api/v1/auth/refresh", json={"refresh_token": new["refresh_token"]})
    assert_problem(after, 401)


async def test_scopes_are_enforced(client: Client, admin: dict[str, str], unique: str) -> None:
    reader = await make_key(client, admin, "read")
    writer = await make_key(client, admin, "write")
    assert (await client.get("/api/v1/devices", headers=reader)).status_code == 200
    assert_problem(await client.post("/api/v1/devices", json={}, headers=reader), 403)
    assert (
        await client.post("/api/v1/devices", json={"id": f"s-{unique}"}, headers=writer)
    ).status_code == 201
    assert (await client.get(f"/api/v1/devices/{unique}", headers=writer)).status_code == 404
    assert_problem(await client.delete(f"/api/v1/devices/s-{unique}", headers=reader), 403)
    assert_problem(await client.get("/api/v1/api-keys", headers=writer), 403)
    assert_problem(
        await client.post("/api/v1/api-keys", json={"name": "x", "scopes": ["admin"]}, headers=writer), 403
    )
    reader_token = issue_token(SECRET, user_principal(uuid.uuid4(), DEFAULT_TENANT_ID, "viewer"), 60)
    bearer = {"Authorization": f"Bearer {reader_token}"}
    assert (await client.get("/api/v1/devices", headers=bearer)).status_code == 200
    assert_problem(await client.post("/api/v1/devices", json={}, headers=bearer), 403)


async def test_api_keys_shown_once_listed_without_secret_and_revoked_at_once(
    client: Client, admin: dict[str, str], unique: str, redis: aioredis.Redis
) -> None:
    created = await client.post(
        "/api/v1/api-keys", json={"name": "ci", "scopes": ["write", "read"]}, headers=admin
    )
    assert created.status_code == 201
    body = created.json()
    key = body["key"]
    assert key.startswith(f"iotk_{body['prefix']}_")
    assert body["scopes"] == ["read", "write"]
    listed = (await client.get("/api/v1/api-keys", headers=admin)).json()["items"]
    assert {k["name"] for k in listed} == {"bootstrap", "ci"}
    assert all("key" not in k for k in listed)
    assert key not in str(listed)

    headers = {"X-API-Key": key}
    assert (await client.get("/api/v1/devices", headers=headers)).status_code == 200
    assert await redis.exists(f"iot:test:{unique}:apikey:{body['prefix']}")  # now served from the cache
    revoked = await client.delete(f"/api/v1/api-keys/{body['id']}", headers=admin)
    assert revoked.status_code == 204
    after = await client.get("/api/v1/devices", headers=headers)
    assert_problem(after, 401)
    assert "revoked" in after.json()["detail"]
    listed = (await client.get("/api/v1/api-keys", headers=admin)).json()["items"]
    assert next(k for k in listed if k["id"] == body["id"])["revoked_at"] is not None

    other = body["id"][:-1] + ("1" if body["id"].endswith("0") else "0")
    assert_problem(await client.delete(f"/api/v1/api-keys/{other}", headers=admin), 404)
    assert_problem(await client.delete("/api/v1/api-keys/not-a-uuid", headers=admin), 404)
    assert_problem(
        await client.post("/api/v1/api-keys", json={"name": "x", "scopes": ["root"]}, headers=admin),
        422,
        "scopes[0]",
    )


async def test_realtime_token_is_short_lived_and_not_an_access_token(
    client: Client, admin: dict[str, str]
) -> None:
    response = await client.post("/api/v1/realtime/token", headers=admin)
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "realtime"
    assert body["expires_in"] == 60
    principal = decode_token(SECRET, body["token"], accept=("realtime",))
    assert principal.kind == "api_key"
    assert principal.allows("admin")
    claims = jwt.decode(body["token"], SECRET, algorithms=["HS256"], options={"verify_iss": False})
    assert claims["exp"] - claims["iat"] == 60
    with pytest.raises(InvalidCredential):
        decode_token(SECRET, body["token"])
    as_access = await client.get("/api/v1/devices", headers={"Authorization": f"Bearer {body['token']}"})
    assert_problem(as_access, 401)
    assert_problem(await client.post("/api/v1/realtime/token"), 401)


async def test_rate_limit_per_principal_is_429_with_retry_after(
    make_client: Any, admin: dict[str, str]
) -> None:
    client = await make_client(api_rate_limit_per_minute=3)
    statuses = [(await client.get("/api/v1/devices", headers=admin)).status_code for _ in range(4)]
    assert statuses[:3] == [200, 200, 200]
    if statuses[3] == 200:  # the minute window turned over between requests: the next three must trip it
        statuses = [(await client.get("/api/v1/devices", headers=admin)).status_code for _ in range(3)]
    limited = await client.get("/api/v1/devices", headers=admin)
    body = assert_problem(limited, 429)
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert "per minute" in body["detail"]
    # Another principal has its own budget.
    other = {"Authorization": "Bearer " + user_token(SECRET, "someone", ttl_s=60)}
    assert (await client.get("/api/v1/devices", headers=other)).status_code == 200


async def test_bootstrap_is_idempotent(make_client: Any, database_url: str) -> None:
    await make_client()
    await make_client()
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM users") == 1
        assert await conn.fetchval("SELECT count(*) FROM api_keys") == 1
        assert await conn.fetchval("SELECT role FROM users") == "admin"
        assert await conn.fetchval("SELECT scopes FROM api_keys") == ["admin"]
    finally:
        await conn.close()


async def _wrong_login(client: Client, email: str = ADMIN_EMAIL) -> Any:
    return await client.post("/api/v1/auth/login", json={"email": email, "password": "wrong password"})


async def test_password_checks_past_the_workers_and_queue_are_shed_with_503(
    make_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Login floods: one worker and one waiting place; further logins are refused at once with 503 and
    Retry-After instead of each taking another 64 MiB thread; never more than one hash at a time."""
    base = await make_server(
        api_password_hash_workers=1,
        api_password_hash_queue=1,
        api_login_failures_per_account=0,
        api_login_failures_per_address=0,
    )
    release = threading.Event()
    lock = threading.Lock()
    running = [0, 0]  # now, most at once
    real_verify = auth_service._verify_password

    def held_verify(password_hash: str, password: str) -> bool:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        release.wait(60)
        with lock:
            running[0] -= 1
        return real_verify(password_hash, password)

    monkeypatch.setattr(auth_service, "_verify_password", held_verify)
    body = {"email": ADMIN_EMAIL, "password": "wrong password"}
    async with httpx.AsyncClient(base_url=base, timeout=90) as http:
        tasks = [asyncio.create_task(http.post("/api/v1/auth/login", json=body)) for _ in range(5)]
        try:
            # Two are admitted (one hashing, one waiting) and held; the three others are answered now.
            done: set[asyncio.Task[httpx.Response]] = set()
            pending: set[asyncio.Task[httpx.Response]] = set(tasks)
            while len(done) < 3 and pending:
                finished, pending = await asyncio.wait(
                    pending, timeout=30, return_when=asyncio.FIRST_COMPLETED
                )
                assert finished, "logins past the workers and the queue were not refused while hashes ran"
                done |= finished
            assert len(done) == 3
            for task in done:
                shed = task.result()
                assert shed.status_code == 503, shed.text
                assert shed.headers["Retry-After"] == "1"
                assert "password checks" in shed.json()["detail"]
        finally:
            release.set()
        for task in pending:
            assert (await task).status_code == 401
    assert running[1] == 1


async def test_a_shed_login_logs_one_warning_line_and_no_stack_trace(
    make_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A login flood sheds with 503 by design: each shed login is one warning line, not a stack trace,
    while a real failure still logs its traceback."""
    base = await make_server(
        api_password_hash_workers=1,
        api_password_hash_queue=0,
        api_login_failures_per_account=0,
        api_login_failures_per_address=0,
    )
    started, release = threading.Event(), threading.Event()

    def held_verify(password_hash: str, password: str) -> bool:
        started.set()
        release.wait(60)
        return False

    monkeypatch.setattr(auth_service, "_verify_password", held_verify)
    body = {"email": ADMIN_EMAIL, "password": "wrong password"}
    async with httpx.AsyncClient(base_url=base, timeout=90) as http:
        held = asyncio.create_task(http.post("/api/v1/auth/login", json=body))
        try:
            assert await asyncio.to_thread(started.wait, 30), "the first login never reached the worker"
            with capture_logs(processors=[merge_contextvars]) as logs:
                shed = await http.post("/api/v1/auth/login", json=body)
        finally:
            release.set()
        assert_problem(await held, 401)
        assert_problem(shed, 503)
        assert [e for e in logs if "exc_info" in e or e["log_level"] in ("error", "critical")] == []
        refused = [e for e in logs if e["log_level"] == "warning"]
        assert len(refused) == 1, logs
        assert refused[0]["status"] == 503
        assert "password checks" in refused[0]["detail"]

        # A bug is still a 500 with its stack trace in the log.
        monkeypatch.setattr(auth_service, "_verify_password", _broken_verify)
        with capture_logs(processors=[merge_contextvars]) as logs:
            assert_problem(await http.post("/api/v1/auth/login", json=body), 500)
        assert [e["log_level"] for e in logs if "exc_info" in e] == ["error"]


def _broken_verify(password_hash: str, password: str) -> bool:
    raise RuntimeError("a bug in the password check")


async def test_failed_logins_are_limited_per_account_and_per_address(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One long window, so that the minute turning over mid-test cannot reset the counters.
    monkeypatch.setattr(limits, "WINDOW_S", 3600)
    client = await make_client(api_login_failures_per_account=3, api_login_failures_per_address=5)
    for _ in range(3):
        assert_problem(await _wrong_login(client), 401)
    # The account has had its three failures: refused without checking, even the right password.
    limited = await _wrong_login(client)
    body = assert_problem(limited, 429)
    assert 1 <= int(limited.headers["Retry-After"]) <= 3600
    assert "failed attempts" in body["detail"]
    right = await client.post("/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert_problem(right, 429)
    # Other accounts from the same address: two more failures reach the address's five.
    assert_problem(await _wrong_login(client, "other1@example.com"), 401)
    assert_problem(await _wrong_login(client, "other2@example.com"), 401)
    assert_problem(await _wrong_login(client, "other3@example.com"), 429)


def _key_lookups(result: str) -> float:
    return REGISTRY.get_sample_value("iot_api_key_lookups_total", {"result": result}) or 0.0


def _random_key() -> str:
    return f"iotk_{secrets.token_hex(6)}_{secrets.token_urlsafe(24)}"


async def test_failed_credentials_are_limited_per_address_before_any_lookup(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random API keys and bad JWTs count against the client address; past the limit they are refused
    with 429 before the database is asked about the key."""
    monkeypatch.setattr(limits, "WINDOW_S", 3600)
    client = await make_client(api_auth_failures_per_minute=5)
    looked_up = _key_lookups("unknown")
    for _ in range(3):
        assert_problem(await client.get("/api/v1/devices", headers={"X-API-Key": _random_key()}), 401)
    for _ in range(2):
        assert_problem(await client.get("/api/v1/devices", headers={"Authorization": "Bearer x.y.z"}), 401)
    for _ in range(5):
        limited = await client.get("/api/v1/devices", headers={"X-API-Key": _random_key()})
        body = assert_problem(limited, 429)
        assert 1 <= int(limited.headers["Retry-After"]) <= 3600
        assert "failed attempts" in body["detail"]
    assert_problem(await client.get("/api/v1/devices", headers={"Authorization": "Bearer x.y.z"}), 429)
    assert _key_lookups("unknown") - looked_up == 3
    # A right credential that needs no look-up still works from this address.
    token = user_token(SECRET, "someone", ttl_s=60)
    assert (
        await client.get("/api/v1/devices", headers={"Authorization": f"Bearer {token}"})
    ).status_code == 200


async def test_an_unknown_key_costs_one_database_lookup(client: Client, admin: dict[str, str]) -> None:
    key = _random_key()
    looked_up = _key_lookups("unknown")
    for _ in range(4):
        assert_problem(await client.get("/api/v1/devices", headers={"X-API-Key": key}), 401)
    assert _key_lookups("unknown") - looked_up == 1
    # A key created afterwards is found at once, whatever was remembered about unknown prefixes.
    created = await make_key(client, admin, "read")
    assert (await client.get("/api/v1/devices", headers=created)).status_code == 200
