"""The tenant a request acts in: resolved once, by the authentication middleware, and handed to every service.

:class:`TenantScope` is the only way tenant data is reached: each service method that reads or changes a
tenant's rows takes one as its first argument, and each repository method takes its ``tenant_id`` as a
required argument. A row of another tenant is then simply not found (404), exactly like a row that does not
exist.

The tenant is the credential's own; a platform admin may select another with ``X-Tenant-Id``
(:func:`selected_tenant`) and acts there as its admin.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection
from litestar.di import NamedDependency

from iot_api.errors import Forbidden, Invalid, Unauthenticated
from iot_common.auth import Principal
from iot_common.tenancy import DEFAULT_TENANT_ID, TENANT_HEADER


@dataclass(frozen=True, slots=True)
class TenantScope:
    """Who acts (``principal``) and in which tenant (``tenant_id``)."""

    tenant_id: uuid.UUID
    principal: Principal

    def allows(self, permission: str) -> bool:
        """Whether the principal holds ``permission`` (``read``, ``operate``, ``write``, ``admin``) here."""
        return self.principal.allows(permission)

    @property
    def actor(self) -> str:
        """The principal as the audit log and ``acked_by`` name it: ``user:<id>`` or ``key:<id>``."""
        principal = self.principal
        return principal.subject if principal.kind == "api_key" else f"user:{principal.subject}"

    @property
    def sees_unattributed(self) -> bool:
        """Dead letters no device can be attributed to (no tenant) are shown to platform admins, in the
        default tenant only: they may hold any tenant's payloads."""
        return self.principal.platform_admin and self.tenant_id == DEFAULT_TENANT_ID


def selected_tenant(principal: Principal, header: str | None) -> uuid.UUID:
    """The tenant a request acts in: the credential's own, or for a platform admin the one ``X-Tenant-Id``
    names (its existence is checked by the caller). Naming another tenant is for platform admins only."""
    if header is None:
        return principal.tenant_id
    try:
        tenant_id = uuid.UUID(header)
    except ValueError:
        raise Invalid(TENANT_HEADER, "not a tenant id (UUID)", "header") from None
    if tenant_id != principal.tenant_id and not principal.platform_admin:
        raise Forbidden(f"only a platform admin selects another tenant with {TENANT_HEADER}")
    return tenant_id


def tenant_of(connection: ASGIConnection[Any, Any, Any, Any]) -> TenantScope:
    """The scope the authentication middleware resolved for this request."""
    scope = connection.scope.get("state", {}).get("tenant")
    if not isinstance(scope, TenantScope):
        raise Unauthenticated("credentials required")
    return scope


Tenant = NamedDependency[TenantScope]
"""How a handler declares it: ``tenant: Tenant`` (provided by :data:`iot_api.state.TENANT`)."""
