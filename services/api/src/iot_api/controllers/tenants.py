"""``/api/v1/tenants`` (platform admins only) and ``/api/v1/audit`` (a tenant's admins)."""

from __future__ import annotations

from litestar import Controller, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from iot_api.controllers.params import PAGE, TIME_RANGE, TenantId
from iot_api.problems import problem_responses
from iot_api.queries import PageRequest, TimeRange
from iot_api.schemas.accounts import ApiKeyCreate, ApiKeyCreated
from iot_api.schemas.tenants import AuditPage, Tenant, TenantCreate, TenantPage, TenantUpdate
from iot_api.state import AppServices
from iot_api.tenancy import Tenant as Caller

_PLATFORM = "A platform admin's operation (403 for anyone else)."


class TenantController(Controller):
    path = "/api/v1/tenants"
    tags = ["tenants"]
    opt = {"permission": "admin", "platform": True}
    dependencies = {"page": PAGE}

    @post("/", operation_id="createTenant", description=_PLATFORM, responses=problem_responses(409, 413))
    async def create_tenant(self, services: AppServices, data: JSONBody[TenantCreate]) -> Tenant:
        """A new tenant, with its limits (``max_devices``, ``max_readings_per_s``; null: none)."""
        return await services.tenants.create(data)

    @get("/", operation_id="listTenants", description=_PLATFORM, responses=problem_responses())
    async def list_tenants(self, services: AppServices, page: NamedDependency[PageRequest]) -> TenantPage:
        """Every tenant, oldest first."""
        return await services.tenants.list(page)

    @get(
        "/{tenant_id:str}", operation_id="getTenant", description=_PLATFORM, responses=problem_responses(404)
    )
    async def get_tenant(self, services: AppServices, tenant_id: TenantId) -> Tenant:
        return await services.tenants.get(tenant_id)

    @patch(
        "/{tenant_id:str}",
        operation_id="updateTenant",
        description=_PLATFORM,
        responses=problem_responses(404, 409, 413),
    )
    async def update_tenant(
        self, services: AppServices, tenant_id: TenantId, data: JSONBody[TenantUpdate]
    ) -> Tenant:
        """Rename a tenant or change its limits (null removes a limit)."""
        return await services.tenants.update(tenant_id, data)

    @delete(
        "/{tenant_id:str}",
        operation_id="deleteTenant",
        description=_PLATFORM,
        responses=problem_responses(404, 409),
    )
    async def delete_tenant(self, services: AppServices, tenant_id: TenantId) -> None:
        """Delete a tenant with its users, API keys, alert rules, alerts and dead letters; 409 while it owns
        devices, and for the default tenant."""
        await services.tenants.delete(tenant_id)

    @post(
        "/{tenant_id:str}/api-keys",
        operation_id="createTenantApiKey",
        description=_PLATFORM,
        responses=problem_responses(404, 413),
    )
    async def create_tenant_key(
        self, services: AppServices, tenant_id: TenantId, data: JSONBody[ApiKeyCreate]
    ) -> ApiKeyCreated:
        """A key of the tenant (to hand a new tenant its first key); ``key`` is in this response only."""
        return await services.tenants.create_key(tenant_id, data)


class AuditController(Controller):
    path = "/api/v1/audit"
    tags = ["tenants"]
    opt = {"permission": "admin"}
    dependencies = {"page": PAGE, "span": TIME_RANGE}

    @get("/", operation_id="listAuditEvents", responses=problem_responses())
    async def list_events(
        self,
        services: AppServices,
        tenant: Caller,
        *,
        span: NamedDependency[TimeRange],
        page: NamedDependency[PageRequest],
    ) -> AuditPage:
        """Every state-changing request of the tenant, newest first: when, who, action, target, request
        id and outcome (kept ``IOT_AUDIT_RETENTION_DAYS``)."""
        return await services.audit.list(tenant, page, span)
