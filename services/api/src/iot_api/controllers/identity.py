"""Device MQTT credentials (``/api/v1/devices/{id}/credentials``) and the EMQX hooks (``/api/v1/mqtt``).

The hooks are called by the broker, not by users: they skip the credential middleware and rate limit,
and check the shared secret ``IOT_MQTT_HOOK_SECRET`` sent in the ``X-Hook-Secret`` header instead.
"""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, post
from litestar.params import HeaderParameter, JSONBody

from iot_api.controllers.params import DeviceIdPath
from iot_api.problems import problem_responses
from iot_api.schemas.identity import (
    AuthnAnswer,
    AuthnRequest,
    AuthzAnswer,
    AuthzRequest,
    CredentialStatus,
    MqttCredentials,
)
from iot_api.services.identity import HOOK_SECRET_HEADER
from iot_api.state import AppServices
from iot_api.tenancy import Tenant

HookSecret = Annotated[
    str | None,
    HeaderParameter(name=HOOK_SECRET_HEADER, required=False, description="The shared IOT_MQTT_HOOK_SECRET"),
]


class CredentialController(Controller):
    path = "/api/v1/devices/{device_id:str}/credentials"
    tags = ["devices"]
    opt = {"permission": "write"}

    @post(operation_id="rotateDeviceCredentials", status_code=201, responses=problem_responses(404, 409, 503))
    async def rotate(self, services: AppServices, tenant: Tenant, device_id: DeviceIdPath) -> MqttCredentials:
        """Issue a new MQTT secret (shown this once); the previous one stops working."""
        return await services.identity.rotate(tenant, device_id)

    @delete(operation_id="revokeDeviceCredentials", responses=problem_responses(404, 503))
    async def revoke(self, services: AppServices, tenant: Tenant, device_id: DeviceIdPath) -> None:
        """Revoke the MQTT credential: connections are refused and an open one is cut."""
        await services.identity.revoke(tenant, device_id)

    @get(operation_id="getDeviceCredentials", permission="read", responses=problem_responses(404))
    async def status(
        self, services: AppServices, tenant: Tenant, device_id: DeviceIdPath
    ) -> CredentialStatus:
        """Whether the device has an active MQTT credential (never the secret)."""
        return await services.identity.status(tenant, device_id)


_HOOK_PROBLEMS = problem_responses(401, 404, public=True)


class MqttHookController(Controller):
    path = "/api/v1/mqtt"
    tags = ["mqtt hooks"]
    opt = {"skip_auth": True}
    security = [{}]

    @post("/authn", operation_id="mqttAuthenticate", status_code=200, responses=_HOOK_PROBLEMS)
    async def authenticate(
        self, services: AppServices, data: JSONBody[AuthnRequest], hook_secret: HookSecret = None
    ) -> AuthnAnswer:
        """EMQX HTTP authentication: may this user name and password connect?"""
        return await services.identity.authn_hook(hook_secret, data)

    @post("/authz", operation_id="mqttAuthorize", status_code=200, responses=_HOOK_PROBLEMS)
    async def authorize(
        self, services: AppServices, data: JSONBody[AuthzRequest], hook_secret: HookSecret = None
    ) -> AuthzAnswer:
        """EMQX HTTP authorisation: may this user publish to or subscribe to this topic?"""
        return await services.identity.authz_hook(hook_secret, data)
