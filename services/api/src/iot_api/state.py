"""The API's state: its services, built once per process by the lifespan (``iot_api.app``) and handed to
handlers, typed, as the ``services`` dependency. Nothing else is kept on ``app.state`` but the settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide

from iot_api.services.alerts import AlertRuleService, AlertService
from iot_api.services.audit import AuditService
from iot_api.services.auth import AuthService
from iot_api.services.commands import CommandService
from iot_api.services.devices import DeviceService
from iot_api.services.exports import ExportService
from iot_api.services.identity import IdentityService
from iot_api.services.imports import ImportService
from iot_api.services.operations import HealthService
from iot_api.services.rejects import RejectService
from iot_api.services.state import StateService
from iot_api.services.telemetry import TelemetryService
from iot_api.services.tenants import TenantService
from iot_api.services.users import UserService
from iot_api.tenancy import TenantScope, tenant_of


@dataclass(frozen=True)
class Services:
    """One service per resource; controllers call these and nothing below them."""

    devices: DeviceService
    identity: IdentityService
    telemetry: TelemetryService
    rejects: RejectService
    alert_rules: AlertRuleService
    alerts: AlertService
    commands: CommandService
    state: StateService
    auth: AuthService
    users: UserService
    tenants: TenantService
    audit: AuditService
    health: HealthService
    imports: ImportService
    exports: ExportService


def services_of(state: State) -> Services:
    """The services of a started application (its lifespan has run)."""
    services = state.get("services")
    if not isinstance(services, Services):
        raise RuntimeError("the API's services are built by its lifespan, which has not run")
    return services


SERVICES = Provide(services_of, sync_to_thread=False)
"""The ``services`` dependency of every handler."""
AppServices = NamedDependency[Services]
"""How a handler declares it: ``services: AppServices``."""


def _tenant(request: Request[Any, Any, Any], services: NamedDependency[Any]) -> TenantScope:
    # ``services`` orders this after the services dependency: Litestar resolves dependencies of one level
    # concurrently, in a task group (two tasks per request), but one at a time when each level has one.
    # (Typed Any: Litestar then does not validate the value it passes.)
    del services
    return tenant_of(request)


TENANT = Provide(_tenant, sync_to_thread=False)
"""The ``tenant`` dependency of every handler: the request's :class:`~iot_api.tenancy.TenantScope`, resolved
by the authentication middleware."""
