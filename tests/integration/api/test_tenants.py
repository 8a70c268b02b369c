"""Tenants, users, roles and the audit log, as a platform team and a tenant's admins use them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient

from iot_common.messages import LatestValue
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_common.topics import RedisNames
from tests.integration.api.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, ClientFactory
from tests.integration.api.tenants import (
    PASSWORD,
    add_user,
    bearer,
    new_tenant,
    tenant_key,
    tenant_with_credentials,
)
from tests.integration.api.test_devices import assert_problem

Client = AsyncTestClient[Any]


async def test_a_platform_team_onboards_a_tenant(client: Client, admin: dict[str, str], unique: str) -> None:
    created = await client.post(
        "/api/v1/tenants", json={"name": f"acme-{unique}", "max_devices": 2}, headers=admin
    )
    assert created.status_code == 201, created.text
    tenant = created.json()
    assert tenant["name"] == f"acme-{unique}"
    assert (tenant["max_devices"], tenant["max_readings_per_s"]) == (2, None)
    listed = (await client.get("/api/v1/tenants", headers=admin)).json()["items"]
    assert [t["name"] for t in listed] == ["default", f"acme-{unique}"]
    assert (await client.get(f"/api/v1/tenants/{tenant['id']}", headers=admin)).json() == tenant
    # Names are unique, case aside.
    assert_problem(await client.post("/api/v1/tenants", json={"name": f"ACME-{unique}"}, headers=admin), 409)
    assert_problem(
        await client.post("/api/v1/tenants", json={"name": "no spaces"}, headers=admin), 422, "name"
    )

    key = await tenant_key(client, admin, tenant["id"], "admin")
    me = (await client.get("/api/v1/auth/me", headers=key)).json()
    assert (me["tenant_id"], me["tenant_name"], me["platform_admin"]) == (
        tenant["id"],
        f"acme-{unique}",
        False,
    )
    # The tenant's first key works in the tenant only: it creates the tenant's devices and users.
    assert (await client.post("/api/v1/devices", json={"id": f"a1-{unique}"}, headers=key)).status_code == 201
    _, email = await add_user(client, key, "operator")
    operator = await bearer(client, email)
    assert [d["id"] for d in (await client.get("/api/v1/devices", headers=operator)).json()["items"]] == [
        f"a1-{unique}"
    ]
    # The platform admin without X-Tenant-Id sees the default tenant only; with it, the tenant.
    assert f"a1-{unique}" not in (await client.get("/api/v1/devices", headers=admin)).text
    selected = await client.get("/api/v1/devices", headers={**admin, "X-Tenant-Id": tenant["id"]})
    assert [d["id"] for d in selected.json()["items"]] == [f"a1-{unique}"]


async def test_tenant_limits_and_deletion(client: Client, admin: dict[str, str], unique: str) -> None:
    tenant_id = await new_tenant(client, admin, f"small-{unique}", max_devices=1)
    key = await tenant_key(client, admin, tenant_id, "write")
    assert (await client.post("/api/v1/devices", json={"id": f"s1-{unique}"}, headers=key)).status_code == 201
    full = assert_problem(await client.post("/api/v1/devices", json={"id": f"s2-{unique}"}, headers=key), 409)
    assert "limit" in full["detail"]
    changed = await client.patch(f"/api/v1/tenants/{tenant_id}", json={"max_devices": None}, headers=admin)
    assert changed.json()["max_devices"] is None
    assert (await client.post("/api/v1/devices", json={"id": f"s2-{unique}"}, headers=key)).status_code == 201

    # A tenant that owns devices is kept; without them it goes, with its keys.
    _, email = await add_user(client, await tenant_key(client, admin, tenant_id, "admin"), "admin")
    token = await bearer(client, email)
    assert_problem(await client.delete(f"/api/v1/tenants/{tenant_id}", headers=admin), 409)
    for device in (f"s1-{unique}", f"s2-{unique}"):
        assert (await client.delete(f"/api/v1/devices/{device}", headers=key)).status_code == 204
    assert (await client.delete(f"/api/v1/tenants/{tenant_id}", headers=admin)).status_code == 204
    assert_problem(await client.get(f"/api/v1/tenants/{tenant_id}", headers=admin), 404)
    assert_problem(await client.get("/api/v1/devices", headers=key), 401)
    # An access token outlives its tenant by minutes: it reads nothing and writes nothing.
    assert (await client.get("/api/v1/devices", headers=token)).json()["items"] == []
    assert_problem(await client.post("/api/v1/devices", json={"id": f"s3-{unique}"}, headers=token), 401)
    # The default tenant stays, and keeps its name.
    assert_problem(await client.delete(f"/api/v1/tenants/{DEFAULT_TENANT_ID}", headers=admin), 409)
    assert_problem(
        await client.patch(f"/api/v1/tenants/{DEFAULT_TENANT_ID}", json={"name": "x"}, headers=admin), 409
    )


async def test_only_platform_admins_select_a_tenant(
    client: Client, admin: dict[str, str], unique: str
) -> None:
    a = await new_tenant(client, admin, f"a-{unique}")
    b_admin = await tenant_key(client, admin, await new_tenant(client, admin, f"b-{unique}"), "admin")
    assert_problem(await client.get("/api/v1/devices", headers={**b_admin, "X-Tenant-Id": a}), 403)
    assert_problem(await client.get("/api/v1/devices", headers={**b_admin, "X-Tenant-Id": "nope"}), 422)
    missing = str(uuid.uuid4())
    assert_problem(await client.get("/api/v1/devices", headers={**admin, "X-Tenant-Id": missing}), 404)
    # A platform admin's realtime token acts in the tenant selected.
    token = await client.post("/api/v1/realtime/token", headers={**admin, "X-Tenant-Id": a})
    assert token.status_code == 200


async def test_roles(client: Client, admin: dict[str, str], unique: str, db: asyncpg.Connection[Any]) -> None:
    tenant = await tenant_with_credentials(client, admin, f"roles-{unique}")
    device = f"r-{unique}"
    assert (
        await client.post("/api/v1/devices", json={"id": device}, headers=tenant.admin)
    ).status_code == 201
    viewer, operator, tenant_admin = (tenant.users[r] for r in ("viewer", "operator", "admin"))
    command = {"name": "reboot"}

    # A viewer reads, and cannot command.
    assert (await client.get(f"/api/v1/devices/{device}", headers=viewer)).status_code == 200
    assert_problem(await client.post(f"/api/v1/devices/{device}/commands", json=command, headers=viewer), 403)
    # An operator commands and acknowledges alerts, but creates no devices, keys or users.
    sent = await client.post(f"/api/v1/devices/{device}/commands", json=command, headers=operator)
    assert sent.status_code == 201, sent.text
    rule = await client.post(
        "/api/v1/alert-rules",
        json={"name": "hot", "device_id": device, "metric": "t", "op": ">", "threshold": 1},
        headers=tenant_admin,
    )
    alert_id = await db.fetchval(
        "INSERT INTO alerts (rule_id, device_id, metric, severity, threshold) VALUES ($1, $2, 't', 'info', 1)"
        " RETURNING id::text",
        uuid.UUID(rule.json()["id"]),
        device,
    )
    assert (await client.post(f"/api/v1/alerts/{alert_id}/ack", headers=operator)).status_code == 200
    assert_problem(await client.post("/api/v1/devices", json={}, headers=operator), 403)
    assert_problem(
        await client.post("/api/v1/api-keys", json={"name": "x", "scopes": ["read"]}, headers=operator), 403
    )
    user = {"email": f"new-{unique}@example.com", "password": PASSWORD, "role": "viewer"}
    assert_problem(await client.post("/api/v1/users", json=user, headers=operator), 403)
    assert_problem(await client.get("/api/v1/users", headers=operator), 403)
    # A tenant admin manages devices, users and keys, and cannot touch tenants.
    assert (await client.post("/api/v1/users", json=user, headers=tenant_admin)).status_code == 201
    for method, path in [
        ("GET", "/api/v1/tenants"),
        ("POST", "/api/v1/tenants"),
        ("GET", f"/api/v1/tenants/{tenant.tenant_id}"),
        ("PATCH", f"/api/v1/tenants/{tenant.tenant_id}"),
        ("DELETE", f"/api/v1/tenants/{tenant.tenant_id}"),
        ("POST", f"/api/v1/tenants/{tenant.tenant_id}/api-keys"),
    ]:
        for headers in (tenant_admin, tenant.admin):
            body = {"name": "x", "scopes": ["admin"]} if method == "POST" else {}
            response = await client.request(method, path, json=body or None, headers=headers)
            assert_problem(response, 403)


async def test_a_key_never_has_more_than_its_creator(
    client: Client, admin: dict[str, str], unique: str
) -> None:
    tenant_id = await new_tenant(client, admin, f"keys-{unique}")
    tenant_admin_key = await tenant_key(client, admin, tenant_id, "admin")
    user_id, email = await add_user(client, tenant_admin_key, "admin")
    person = await bearer(client, email)
    made = await client.post("/api/v1/api-keys", json={"name": "ci", "scopes": ["write"]}, headers=person)
    assert made.status_code == 201
    assert made.json()["created_by"] == user_id
    key = {"X-API-Key": made.json()["key"]}
    assert (await client.post("/api/v1/devices", json={"id": f"k1-{unique}"}, headers=key)).status_code == 201
    # A write key cannot create keys; an admin key cannot create one beyond itself either way.
    assert_problem(
        await client.post("/api/v1/api-keys", json={"name": "x", "scopes": ["read"]}, headers=key), 403
    )
    # The creator demoted to viewer: the key now reads, nothing more (at once: its cache entry is dropped).
    demoted = await client.patch(
        f"/api/v1/users/{user_id}", json={"role": "viewer"}, headers=tenant_admin_key
    )
    assert demoted.json()["role"] == "viewer"
    assert_problem(await client.post("/api/v1/devices", json={"id": f"k2-{unique}"}, headers=key), 403)
    assert (await client.get("/api/v1/devices", headers=key)).status_code == 200
    me = (await client.get("/api/v1/auth/me", headers=key)).json()
    assert (me["scopes"], me["permissions"]) == (["write"], ["read"])
    # The creator deleted: the key is revoked.
    assert (await client.delete(f"/api/v1/users/{user_id}", headers=tenant_admin_key)).status_code == 204
    assert_problem(await client.get("/api/v1/devices", headers=key), 401)


async def test_users_and_their_own_password(
    client: Client, admin: dict[str, str], unique: str, make_client: ClientFactory
) -> None:
    tenant_id = await new_tenant(client, admin, f"users-{unique}")
    tenant_admin = await tenant_key(client, admin, tenant_id, "admin")
    user_id, email = await add_user(client, tenant_admin, "viewer")
    listed = (await client.get("/api/v1/users", headers=tenant_admin)).json()["items"]
    assert [(u["email"], u["role"], u["tenant_id"]) for u in listed] == [(email, "viewer", tenant_id)]
    assert "password" not in str(listed)
    # E-mails are unique across tenants (a login names no tenant).
    taken = {"email": ADMIN_EMAIL, "password": PASSWORD, "role": "viewer"}
    assert_problem(await client.post("/api/v1/users", json=taken, headers=tenant_admin), 409)
    bad_role = {"email": f"x-{unique}@example.com", "password": PASSWORD, "role": "owner"}
    assert_problem(await client.post("/api/v1/users", json=bad_role, headers=tenant_admin), 422, "role")

    viewer = await bearer(client, email)
    change = {"password": "a brand new password"}
    assert_problem(await client.patch(f"/api/v1/users/{user_id}", json=change, headers=viewer), 422)
    wrong = {**change, "current_password": "not it"}
    assert_problem(await client.patch(f"/api/v1/users/{user_id}", json=wrong, headers=viewer), 422)
    right = {**change, "current_password": PASSWORD}
    assert (await client.patch(f"/api/v1/users/{user_id}", json=right, headers=viewer)).status_code == 200
    await bearer(client, email, "a brand new password")
    # Their own role, or anyone else's account, is the tenant admins' business.
    assert_problem(
        await client.patch(f"/api/v1/users/{user_id}", json={"role": "admin"}, headers=viewer), 403
    )
    other_id, _ = await add_user(client, tenant_admin, "viewer")
    assert_problem(await client.patch(f"/api/v1/users/{other_id}", json=right, headers=viewer), 403)
    # A disabled user cannot log in.
    await client.patch(f"/api/v1/users/{user_id}", json={"disabled": True}, headers=tenant_admin)
    refused = await client.post(
        "/api/v1/auth/login", json={"email": email, "password": "a brand new password"}
    )
    assert_problem(refused, 401)


async def test_a_default_tenant_admin_cannot_take_over_the_platform_admin(
    client: Client, admin: dict[str, str]
) -> None:
    default_admin_id, email = await add_user(client, admin, "admin")
    default_admin = await bearer(client, email)
    platform = await bearer(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    platform_id = (await client.get("/api/v1/auth/me", headers=platform)).json()["subject"]
    for change in ({"password": "taken over now"}, {"role": "viewer"}, {"disabled": True}):
        assert_problem(
            await client.patch(f"/api/v1/users/{platform_id}", json=change, headers=default_admin), 403
        )
    assert_problem(await client.delete(f"/api/v1/users/{platform_id}", headers=default_admin), 403)
    assert default_admin_id != platform_id


async def test_the_audit_log_records_every_change_of_the_tenant(
    client: Client, admin: dict[str, str], unique: str
) -> None:
    tenant_id = await new_tenant(client, admin, f"audit-{unique}")
    key = await tenant_key(client, admin, tenant_id, "admin")
    reader = await tenant_key(client, admin, tenant_id, "read")
    me = (await client.get("/api/v1/auth/me", headers=key)).json()
    device = f"au-{unique}"
    created = await client.post(
        "/api/v1/devices", json={"id": device}, headers={**key, "X-Request-ID": f"req-{unique}"}
    )
    assert created.status_code == 201
    await client.patch(f"/api/v1/devices/{device}", json={"name": "x"}, headers=key)
    assert_problem(await client.post("/api/v1/devices", json={}, headers=reader), 403)
    assert_problem(await client.delete(f"/api/v1/devices/nope-{unique}", headers=key), 404)
    await client.get("/api/v1/devices", headers=key)  # a read: not recorded

    events = (await client.get("/api/v1/audit", headers=key)).json()["items"]
    summary = [(e["action"], e["target"], e["status"], e["outcome"]) for e in events]
    assert summary[:4] == [
        ("deleteDevice", f"devices/nope-{unique}", 404, "refused"),
        ("createDevice", "devices", 403, "refused"),
        ("updateDevice", f"devices/{device}", 200, "ok"),
        ("createDevice", f"devices/{device}", 201, "ok"),
    ]
    assert events[3]["actor"] == me["subject"]
    assert events[3]["actor_kind"] == "api_key"
    assert events[3]["request_id"] == f"req-{unique}"
    # The platform's onboarding of the tenant is in the tenant's log too; another tenant sees none of it.
    assert [e["action"] for e in events[-3:]] == ["createTenantApiKey", "createTenantApiKey", "createTenant"]
    assert_problem(await client.get("/api/v1/audit", headers=reader), 403)
    default_log = (await client.get("/api/v1/audit", headers=admin)).text
    assert device not in default_log


async def test_a_device_id_taken_again_by_another_tenant_starts_without_history(
    client: Client,
    admin: dict[str, str],
    unique: str,
    db: asyncpg.Connection[Any],
    redis: aioredis.Redis,
    redis_names: RedisNames,
) -> None:
    a = await tenant_key(client, admin, await new_tenant(client, admin, f"old-{unique}"), "write")
    b = await tenant_key(client, admin, await new_tenant(client, admin, f"new-{unique}"), "write")
    device = f"reused-{unique}"
    assert (await client.post("/api/v1/devices", json={"id": device}, headers=a)).status_code == 201
    # Taken: the answer does not say by whom.
    taken = assert_problem(await client.post("/api/v1/devices", json={"id": device}, headers=b), 409)
    assert taken["detail"] == f"device {device!r} already exists"
    now = datetime.now(UTC)
    await db.execute(
        "INSERT INTO telemetry (device_id, metric, ts, value) VALUES ($1, 't', $2, 1)", device, now
    )
    await redis.hset(redis_names.latest_key(device), "t", msgspec.json.encode(LatestValue(1.0, now)))
    assert (await client.get(f"/api/v1/devices/{device}/latest", headers=a)).json()["metrics"] != {}

    assert (await client.delete(f"/api/v1/devices/{device}", headers=a)).status_code == 204
    assert (await client.post("/api/v1/devices", json={"id": device}, headers=b)).status_code == 201
    assert (await client.get(f"/api/v1/devices/{device}/latest", headers=b)).json()["metrics"] == {}
    raw = await client.get(f"/api/v1/devices/{device}/telemetry", headers=b)
    assert raw.json()["items"] == []
