"""Tenants: created, changed and deleted by platform admins, who may also act in any of them.

- ``default`` (migration 0010) holds the platform admins and every row from before tenants; it can be
  neither renamed nor deleted.
- A tenant is deleted with its users, API keys, alert rules, alerts and dead letters, once it owns no
  devices (deleting those first also removes their broker credentials).
- A new tenant gets its first API key from a platform admin (:meth:`TenantService.create_key`); that key
  belongs to the tenant and has no creating user (nothing caps it but its scopes).
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import msgspec

from iot_api.errors import Conflict, NotFound
from iot_api.pagination import TIME_AND_UUID, paginate
from iot_api.queries import PageRequest
from iot_api.repositories.tenants import TenantHasDevices, TenantRepository
from iot_api.schemas.accounts import ApiKeyCreate, ApiKeyCreated
from iot_api.schemas.tenants import Tenant, TenantCreate, TenantPage, TenantUpdate
from iot_api.services.auth import AuthService
from iot_api.tenancy import selected_tenant
from iot_common.auth import Principal
from iot_common.tenancy import DEFAULT_TENANT_ID


def _not_found(tenant_id: uuid.UUID) -> NotFound:
    return NotFound(f"tenant '{tenant_id}' not found")


class TenantService:
    def __init__(self, repo: TenantRepository, auth: AuthService) -> None:
        self.repo = repo
        self.auth = auth

    async def resolve(self, principal: Principal, header: str | None) -> uuid.UUID:
        """The tenant a request of ``principal`` acts in (``X-Tenant-Id``: see
        :func:`~iot_api.tenancy.selected_tenant`); 404 for a platform admin naming no tenant."""
        tenant_id = selected_tenant(principal, header)
        if tenant_id != principal.tenant_id and not await self.repo.exists(tenant_id):
            raise _not_found(tenant_id)
        return tenant_id

    async def list(self, page: PageRequest) -> TenantPage:
        return await paginate(
            TenantPage,
            page,
            TIME_AND_UUID,
            lambda after, n: self.repo.list(after=after, limit=n),
            lambda tenant: (tenant.created_at, tenant.id),
        )

    async def get(self, tenant_id: uuid.UUID) -> Tenant:
        tenant = await self.repo.get(tenant_id)
        if tenant is None:
            raise _not_found(tenant_id)
        return tenant

    async def create(self, data: TenantCreate) -> Tenant:
        tenant = await self.repo.create(msgspec.structs.asdict(data))
        if tenant is None:
            raise Conflict(f"a tenant named {data.name!r} exists")
        return tenant

    async def update(self, tenant_id: uuid.UUID, data: TenantUpdate) -> Tenant:
        changes: dict[str, Any] = {
            f: getattr(data, f) for f in data.__struct_fields__ if getattr(data, f) is not msgspec.UNSET
        }
        if "name" in changes and tenant_id == DEFAULT_TENANT_ID:
            raise Conflict("the default tenant keeps its name")
        if not changes:
            return await self.get(tenant_id)
        try:
            tenant = await self.repo.update(tenant_id, changes)
        except asyncpg.UniqueViolationError:
            raise Conflict(f"a tenant named {changes['name']!r} exists") from None
        if tenant is None:
            raise _not_found(tenant_id)
        return tenant

    async def delete(self, tenant_id: uuid.UUID) -> None:
        """Delete the tenant and what it owns (409 while it owns devices; the default tenant stays)."""
        if tenant_id == DEFAULT_TENANT_ID:
            raise Conflict("the default tenant cannot be deleted")
        try:
            prefixes = await self.repo.delete(tenant_id)
        except TenantHasDevices:
            raise Conflict("the tenant still owns devices: delete them first") from None
        if prefixes is None:
            raise _not_found(tenant_id)
        await self.auth.forget_keys(prefixes)

    async def create_key(self, tenant_id: uuid.UUID, data: ApiKeyCreate) -> ApiKeyCreated:
        """A key of the tenant (its first, typically), owned by the tenant: no creating user caps it."""
        await self.get(tenant_id)
        return await self.auth.issue_key(tenant_id, data, None)
