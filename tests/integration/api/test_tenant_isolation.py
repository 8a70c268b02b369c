"""Tenant isolation, route by route: with resources of tenant A and the credentials of tenant B (a user of
each role, a key of each scope), no route returns A's data or changes it.

The table :data:`RULES` is checked against the application's own route table: a route added without a rule
here fails :func:`test_every_route_has_an_isolation_rule`, so every new route states how it keeps tenants
apart. A rule says what B gets when it names A's resources:

- ``hidden``: 404, exactly as for a resource that does not exist (403 when B's credential lacks the route's
  permission anyway): the answer is compared with the one for a made-up id.
- ``listed``: 200 (403 without the permission), with none of A's data in it.
- ``refused``: a creation naming A's resource is refused with the given status, which does not say whose
  it is.
- ``own``: acts on B's own tenant (what it returns or creates is B's).
- ``platform``: 403, whoever B is: tenants are the platform admins' business.
- ``exempt``: the route holds no tenant data (the reason is given).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import msgspec
import pytest
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient

from iot_common.messages import LatestValue
from iot_common.tenancy import ROLE_PERMISSIONS, SCOPE_PERMISSIONS
from iot_common.topics import RedisNames
from iot_testkit.processes import JWT_SECRET
from tests.integration.api.conftest import ClientFactory
from tests.integration.api.tenants import PASSWORD, TenantCredentials, tenant_with_credentials

Client = AsyncTestClient[Any]


@dataclass
class TenantA:
    """A's resources, by the names the rules use in paths and bodies."""

    ids: dict[str, str]
    markers: list[str] = field(default_factory=list)
    """Strings that only A's data contains: none may appear in an answer to B."""


@dataclass(frozen=True)
class Rule:
    kind: str
    path: dict[str, str] = field(default_factory=dict)
    """Path parameter -> name of A's resource (``device``, ``rule``...) put in its place."""
    body: Callable[[TenantA, str], Any] | None = None
    query: Callable[[TenantA], Any] | None = None
    status: int = 0
    """For ``refused``: the status B gets."""
    needs: str | None = None
    """The permission that decides between 403 and the rule's answer, when not the route's own."""
    check: Callable[[dict[str, Any], TenantCredentials], None] | None = None
    echoes: Callable[[dict[str, Any]], Any] | None = None
    """What of an answer may hold A's ids because B sent them (the audit log's paths of B's own requests):
    the answer without it is searched for A's data."""
    reason: str = ""


def _no_metrics(body: dict[str, Any], _b: TenantCredentials) -> None:
    assert all(item["metrics"] == {} for item in body["items"]), body


def _no_points(body: dict[str, Any], _b: TenantCredentials) -> None:
    assert all(series["points"] == [] for series in body["series"]), body


def _is_b(body: dict[str, Any], b: TenantCredentials) -> None:
    assert body["tenant_id"] == b.tenant_id, body


def _token_is_b(body: dict[str, Any], b: TenantCredentials) -> None:
    claims = jwt.decode(body["token"], JWT_SECRET, algorithms=["HS256"], issuer="iot-platform")
    assert claims["tenant"] == b.tenant_id


def _without_paths(body: dict[str, Any]) -> Any:
    return [{k: v for k, v in event.items() if k not in ("path", "target")} for event in body["items"]]


DEVICE = {"device_id": "device"}
RULES: dict[str, Rule] = {
    # No tenant data.
    "GET /healthz": Rule("exempt", reason="liveness"),
    "GET /readyz": Rule("exempt", reason="readiness"),
    "GET /metrics": Rule("exempt", reason="process metrics, no tenant data"),
    "POST /api/v1/auth/login": Rule("exempt", reason="public: a login names no tenant"),
    "POST /api/v1/auth/refresh": Rule("exempt", reason="public: a session names its user"),
    "POST /api/v1/auth/logout": Rule("exempt", reason="public: ends a session"),
    "POST /api/v1/mqtt/authn": Rule(
        "exempt", reason="the broker's hook (hook secret): a device's own credential"
    ),
    "POST /api/v1/mqtt/authz": Rule(
        "exempt", reason="the broker's hook (hook secret): a device's own topics"
    ),
    "GET /dashboard/config.json": Rule("exempt", reason="public static configuration"),
    "GET /dashboard": Rule("exempt", reason="public static files"),
    "GET /dashboard/{file_path:path}": Rule("exempt", reason="public static files"),
    "HEAD /dashboard/{file_path:path}": Rule("exempt", reason="public static files"),
    # The caller itself.
    "GET /api/v1/auth/me": Rule("own", check=_is_b),
    "POST /api/v1/realtime/token": Rule("own", check=_token_is_b),
    # Keys and users.
    "GET /api/v1/api-keys": Rule("listed"),
    "POST /api/v1/api-keys": Rule(
        "own", body=lambda a, u: {"name": f"k-{u}", "scopes": ["read"]}, check=_is_b
    ),
    "DELETE /api/v1/api-keys/{key_id:str}": Rule("hidden", path={"key_id": "key"}),
    "GET /api/v1/users": Rule("listed"),
    "POST /api/v1/users": Rule(
        "own",
        body=lambda a, u: {
            "email": f"b-{uuid.uuid4().hex[:8]}@example.com",
            "password": PASSWORD,
            "role": "admin",
        },
        check=_is_b,
    ),
    "PATCH /api/v1/users/{user_id:str}": Rule(
        "hidden", path={"user_id": "user"}, body=lambda a, u: {"role": "viewer"}, needs="admin"
    ),
    "DELETE /api/v1/users/{user_id:str}": Rule("hidden", path={"user_id": "user"}),
    # Tenants: platform admins only.
    "GET /api/v1/tenants": Rule("platform"),
    "POST /api/v1/tenants": Rule("platform", body=lambda a, u: {"name": f"x-{u}"}),
    "GET /api/v1/tenants/{tenant_id:str}": Rule("platform", path={"tenant_id": "tenant"}),
    "PATCH /api/v1/tenants/{tenant_id:str}": Rule(
        "platform", path={"tenant_id": "tenant"}, body=lambda a, u: {"max_devices": 0}
    ),
    "DELETE /api/v1/tenants/{tenant_id:str}": Rule("platform", path={"tenant_id": "tenant"}),
    "POST /api/v1/tenants/{tenant_id:str}/api-keys": Rule(
        "platform", path={"tenant_id": "tenant"}, body=lambda a, u: {"name": "x", "scopes": ["admin"]}
    ),
    "GET /api/v1/audit": Rule("listed", echoes=_without_paths),
    # Devices and their credentials.
    "GET /api/v1/devices": Rule("listed", query=lambda a: {"q": a.ids["device"]}),
    "GET /api/v1/device/list": Rule("listed"),
    "POST /api/v1/devices": Rule("refused", body=lambda a, u: {"id": a.ids["device"]}, status=409),
    "POST /api/v1/devices/import": Rule("refused", body=lambda a, u: {"id": a.ids["device"]}, status=422),
    "GET /api/v1/devices/{device_id:str}": Rule("hidden", path=DEVICE),
    "PATCH /api/v1/devices/{device_id:str}": Rule("hidden", path=DEVICE, body=lambda a, u: {"name": "taken"}),
    "DELETE /api/v1/devices/{device_id:str}": Rule("hidden", path=DEVICE),
    "GET /api/v1/devices/{device_id:str}/credentials": Rule("hidden", path=DEVICE),
    "POST /api/v1/devices/{device_id:str}/credentials": Rule("hidden", path=DEVICE),
    "DELETE /api/v1/devices/{device_id:str}/credentials": Rule("hidden", path=DEVICE),
    # Telemetry.
    "GET /api/v1/devices/{device_id:str}/latest": Rule("hidden", path=DEVICE),
    "GET /api/v1/devices/{device_id:str}/telemetry": Rule("hidden", path=DEVICE),
    "GET /api/v1/telemetry/latest": Rule(
        "listed", query=lambda a: {"device_id": a.ids["device"]}, check=_no_metrics
    ),
    "GET /api/v1/telemetry/history": Rule(
        "listed", query=lambda a: {"device_id": a.ids["device"], "metric": "temp"}, check=_no_points
    ),
    "GET /api/v1/telemetry/export": Rule(
        "hidden", query=lambda a: {"device_id": a.ids["device"], "metric": "temp"}
    ),
    "GET /api/v1/ingest/rejects": Rule("listed"),
    # Alerts and commands.
    "GET /api/v1/alert-rules": Rule("listed"),
    "POST /api/v1/alert-rules": Rule(
        "refused",
        body=lambda a, u: {
            "name": "r",
            "device_id": a.ids["device"],
            "metric": "t",
            "op": ">",
            "threshold": 1,
        },
        status=422,
    ),
    "GET /api/v1/alert-rules/{rule_id:str}": Rule("hidden", path={"rule_id": "rule"}),
    "PATCH /api/v1/alert-rules/{rule_id:str}": Rule(
        "hidden", path={"rule_id": "rule"}, body=lambda a, u: {"enabled": False}
    ),
    "DELETE /api/v1/alert-rules/{rule_id:str}": Rule("hidden", path={"rule_id": "rule"}),
    "GET /api/v1/alerts": Rule("listed"),
    "GET /api/v1/alerts/{alert_id:str}": Rule("hidden", path={"alert_id": "alert"}),
    "POST /api/v1/alerts/{alert_id:str}/ack": Rule("hidden", path={"alert_id": "alert"}),
    "GET /api/v1/devices/{device_id:str}/commands": Rule("hidden", path=DEVICE),
    "POST /api/v1/devices/{device_id:str}/commands": Rule(
        "hidden", path=DEVICE, body=lambda a, u: {"name": "reboot"}
    ),
    "GET /api/v1/devices/{device_id:str}/commands/{command_id:str}": Rule(
        "hidden", path={**DEVICE, "command_id": "command"}
    ),
    # Device state.
    "GET /api/v1/devices/{device_id:str}/state": Rule("hidden", path=DEVICE),
    "PATCH /api/v1/devices/{device_id:str}/state": Rule(
        "hidden", path=DEVICE, body=lambda a, u: {"desired": {"mode": f"b-{u}"}}
    ),
    "GET /api/v1/devices/{device_id:str}/state/history": Rule("hidden", path=DEVICE),
}

_PARAM = re.compile(r"\{(\w+):\w+\}")


def route_table(client: Client) -> dict[str, Any]:
    """``METHOD path`` -> handler, for every route the application serves (the OpenAPI pages and the
    automatic OPTIONS answers aside)."""
    table = {}
    for route in client.app.routes:
        if route.path.startswith("/api/docs"):
            continue
        for handler in getattr(route, "route_handlers", []):
            for method in sorted(getattr(handler, "http_methods", ())):
                if method != "OPTIONS":
                    table[f"{method} {route.path}"] = handler
    return table


async def test_every_route_has_an_isolation_rule(make_client: ClientFactory, tmp_path: Path) -> None:
    # A built dashboard (here an empty one) mounts its static routes: whether or not this checkout built it.
    routes = set(route_table(await make_client(dashboard_dir=str(tmp_path))))
    assert sorted(routes - set(RULES)) == [], "declare how each new route keeps tenants apart in RULES"
    assert sorted(set(RULES) - routes) == [], "RULES names routes that no longer exist"


def permitted(credential: str, permission: str) -> bool:
    kind, name = credential.split(":")
    granted = ROLE_PERMISSIONS[name] if kind == "user" else SCOPE_PERMISSIONS[name]  # type: ignore[index]
    return permission in granted


async def seed_tenant_a(
    client: Client,
    admin: dict[str, str],
    db: asyncpg.Connection[Any],
    redis: aioredis.Redis,
    redis_names: RedisNames,
    unique: str,
) -> tuple[TenantA, TenantCredentials]:
    a = await tenant_with_credentials(client, admin, f"a-{unique}")
    device = f"a-dev-{unique}"
    headers = a.admin
    assert (
        await client.post("/api/v1/devices", json={"id": device, "name": f"secret-{unique}"}, headers=headers)
    ).status_code == 201
    rule = await client.post(
        "/api/v1/alert-rules",
        json={"name": f"rule-{unique}", "device_id": device, "metric": "temp", "op": ">", "threshold": 1},
        headers=headers,
    )
    alert = await db.fetchval(
        "INSERT INTO alerts (rule_id, device_id, metric, severity, threshold, message)"
        " VALUES ($1, $2, 'temp', 'info', 1, $3) RETURNING id::text",
        uuid.UUID(rule.json()["id"]),
        device,
        f"alert-{unique}",
    )
    command = await client.post(
        f"/api/v1/devices/{device}/commands", json={"name": "reboot"}, headers=headers
    )
    assert command.status_code == 201, command.text
    state = await client.patch(
        f"/api/v1/devices/{device}/state", json={"desired": {"mode": f"state-{unique}"}}, headers=headers
    )
    assert state.status_code == 200, state.text
    now = datetime.now(UTC)
    await db.execute(
        "INSERT INTO telemetry (device_id, metric, ts, value) VALUES ($1, 'temp', $2, 42.5)", device, now
    )
    await redis.hset(redis_names.latest_key(device), "temp", msgspec.json.encode(LatestValue(42.5, now)))
    await db.execute(
        "INSERT INTO ingest_rejects (topic, device_id, reason, payload) VALUES ($1, $2, 'invalid_json', $3)",
        f"devices/telemetry/{device}",
        device,
        f"payload-{unique}",
    )
    keys = (await client.get("/api/v1/api-keys", headers=headers)).json()["items"]
    users = (await client.get("/api/v1/users", headers=headers)).json()["items"]
    ids = {
        "tenant": a.tenant_id,
        "device": device,
        "rule": rule.json()["id"],
        "alert": alert,
        "command": command.json()["id"],
        "key": keys[0]["id"],
        "user": users[0]["id"],
    }
    markers = [
        device,
        f"secret-{unique}",
        f"rule-{unique}",
        f"alert-{unique}",
        f"payload-{unique}",
        f"state-{unique}",
        a.tenant_id,
    ]
    markers += (
        [ids[k] for k in ("rule", "alert", "command")] + [k["id"] for k in keys] + [u["id"] for u in users]
    )
    markers += [u["email"] for u in users]
    return TenantA(ids, markers), a


async def snapshot(db: asyncpg.Connection[Any], tenant_id: str) -> list[Any]:
    """Every row of A that B could change."""
    t = uuid.UUID(tenant_id)
    return [
        await db.fetch(f"SELECT * FROM {table} WHERE tenant_id = $1 ORDER BY 1", t)
        for table in (
            "devices",
            "alert_rules",
            "alerts",
            "commands",
            "api_keys",
            "users",
            "device_state",
            "device_state_history",
        )
    ] + [
        await db.fetch("SELECT * FROM tenants WHERE id = $1", t),
        await db.fetch(
            "SELECT c.* FROM device_credentials c JOIN devices d ON d.id = c.device_id"
            " WHERE d.tenant_id = $1",
            t,
        ),
    ]


def _url(path: str, rule: Rule, ids: dict[str, str]) -> str:
    return _PARAM.sub(lambda m: ids[rule.path[m.group(1)]], path)


@pytest.mark.parametrize("with_header", [False, True], ids=["own tenant", "X-Tenant-Id of A"])
async def test_no_route_gives_tenant_b_the_data_of_tenant_a(
    client: Client,
    admin: dict[str, str],
    db: asyncpg.Connection[Any],
    redis: aioredis.Redis,
    redis_names: RedisNames,
    unique: str,
    with_header: bool,
) -> None:
    a, _ = await seed_tenant_a(client, admin, db, redis, redis_names, unique)
    b = await tenant_with_credentials(client, admin, f"b-{unique}")
    before = await snapshot(db, a.ids["tenant"])
    missing = {
        **{k: str(uuid.uuid4()) for k in a.ids},
        "device": f"zz-{unique}",
    }
    table = route_table(client)
    checked = 0
    for name, rule in RULES.items():
        if rule.kind == "exempt":
            continue
        method, path = name.split(" ", 1)
        route_permission = table[name].opt["permission"]
        for credential, headers in b.all().items():
            if with_header:
                headers = {**headers, "X-Tenant-Id": a.ids["tenant"]}
            url = _url(path, rule, a.ids)
            body = rule.body(a, unique) if rule.body else None
            params = rule.query(a) if rule.query else None
            response = await client.request(method, url, json=body, params=params, headers=headers)
            where = f"{name} as {credential}: {response.status_code} {response.text[:300]}"
            checked += 1
            if with_header:
                # Naming A's tenant is for platform admins only.
                assert response.status_code == 403, where
                continue
            allowed = permitted(credential, rule.needs or route_permission)
            if rule.kind == "platform" or not allowed:
                assert response.status_code == 403, where
                continue
            if rule.kind == "hidden":
                assert response.status_code == 404, where
                # Exactly as for a resource that does not exist.
                other = await client.request(
                    method, _url(path, rule, missing), json=body, params=params, headers=headers
                )
                swap = {a.ids[k]: missing[k] for k in rule.path.values()}
                detail = response.json()["detail"]
                for real, made_up in swap.items():
                    detail = detail.replace(real, made_up)
                assert (other.status_code, other.json()["detail"]) == (404, detail), where
                continue
            if rule.kind == "refused":
                assert response.status_code == rule.status, where
                leaked = [m for m in a.markers if m in response.text and m != a.ids["device"]]
                assert leaked == [], where
                continue
            assert 200 <= response.status_code < 300, where
            echoed = a.ids["device"] if rule.check else None  # the device asked for, named in the answer
            text = str(rule.echoes(response.json())) if rule.echoes else response.text
            leaked = [m for m in a.markers if m in text and m != echoed]
            assert leaked == [], f"{where}: {leaked}"
            if rule.check is not None:
                rule.check(response.json(), b)
    assert checked > 200
    assert await snapshot(db, a.ids["tenant"]) == before
