"""Helpers for tests with several tenants: a tenant, its keys and users, as a platform team creates them."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from litestar.testing import AsyncTestClient

Client = AsyncTestClient[Any]
PASSWORD = "tenant user password"


async def new_tenant(client: Client, platform: dict[str, str], name: str, **limits: int | None) -> str:
    """Create a tenant as a platform admin; its id."""
    response = await client.post("/api/v1/tenants", json={"name": name, **limits}, headers=platform)
    assert response.status_code == 201, response.text
    tenant_id: str = response.json()["id"]
    return tenant_id


async def tenant_key(
    client: Client, platform: dict[str, str], tenant_id: str, *scopes: str
) -> dict[str, str]:
    """A key of the tenant (the platform's onboarding route); the headers that use it."""
    response = await client.post(
        f"/api/v1/tenants/{tenant_id}/api-keys", json={"name": "k", "scopes": list(scopes)}, headers=platform
    )
    assert response.status_code == 201, response.text
    return {"X-API-Key": response.json()["key"]}


async def add_user(client: Client, tenant_admin: dict[str, str], role: str) -> tuple[str, str]:
    """A user of the admin's tenant with ``role``; (its id, its e-mail)."""
    email = f"{role}-{secrets.token_hex(4)}@example.com"
    response = await client.post(
        "/api/v1/users", json={"email": email, "password": PASSWORD, "role": role}, headers=tenant_admin
    )
    assert response.status_code == 201, response.text
    return response.json()["id"], email


async def bearer(client: Client, email: str, password: str = PASSWORD) -> dict[str, str]:
    """Log in; the headers of the access token."""
    response = await client.post("/api/v1/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


@dataclass
class TenantCredentials:
    """A tenant and one credential of each kind: users of each role, keys of each scope."""

    tenant_id: str
    keys: dict[str, dict[str, str]] = field(default_factory=dict)
    users: dict[str, dict[str, str]] = field(default_factory=dict)
    user_ids: dict[str, str] = field(default_factory=dict)

    @property
    def admin(self) -> dict[str, str]:
        return self.keys["admin"]

    def all(self) -> dict[str, dict[str, str]]:
        """Every credential by a name: ``user:viewer``..., ``key:read``..."""
        return {
            **{f"user:{r}": h for r, h in self.users.items()},
            **{f"key:{s}": h for s, h in self.keys.items()},
        }


async def tenant_with_credentials(client: Client, platform: dict[str, str], name: str) -> TenantCredentials:
    tenant = TenantCredentials(await new_tenant(client, platform, name))
    for scope in ("read", "write", "admin"):
        tenant.keys[scope] = await tenant_key(client, platform, tenant.tenant_id, scope)
    for role in ("viewer", "operator", "admin"):
        user_id, email = await add_user(client, tenant.admin, role)
        tenant.user_ids[role] = user_id
        tenant.users[role] = await bearer(client, email)
    return tenant
