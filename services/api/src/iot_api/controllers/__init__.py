"""HTTP edge: one Litestar Controller per resource; each handler turns the request into a service call.

A resource is added as a Controller in this package with ``opt={"permission": ...}`` and
:func:`iot_api.problems.problem_responses`, listed in :data:`CONTROLLERS`; its handlers take the
``services`` dependency (:class:`iot_api.state.Services`) and call one method of its service.
"""

from __future__ import annotations

from litestar.types import ControllerRouterHandler

from iot_api.controllers.accounts import ApiKeyController, AuthController, UserController
from iot_api.controllers.alerts import AlertController, AlertRuleController
from iot_api.controllers.commands import CommandController
from iot_api.controllers.dashboard import dashboard_config
from iot_api.controllers.devices import DeviceController
from iot_api.controllers.identity import CredentialController, MqttHookController
from iot_api.controllers.operations import healthz, metrics, readyz
from iot_api.controllers.rejects import RejectController
from iot_api.controllers.state import StateController
from iot_api.controllers.telemetry import TelemetryController
from iot_api.controllers.tenants import AuditController, TenantController

CONTROLLERS: list[ControllerRouterHandler] = [
    healthz,
    readyz,
    metrics,
    AuthController,
    ApiKeyController,
    UserController,
    TenantController,
    AuditController,
    DeviceController,
    TelemetryController,
    RejectController,
    AlertRuleController,
    AlertController,
    CommandController,
    StateController,
    CredentialController,
    MqttHookController,
    dashboard_config,
]
