"""Device MQTT credentials (``/api/v1/devices/{id}/credentials``) and the EMQX hooks (``/api/v1/mqtt``).

The hooks are called by the broker, not by users: they skip the credential middleware and rate limit,
and check the shared secret ``IOT_MQTT_HOOK_SECRET`` sent in the ``X-Hook-Secret`` header instead.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from litestar import Controller, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import HeaderParameter, JSONBody, PathParameter

from iot_api.identity_schemas import (
    AuthnAnswer,
    AuthnRequest,
    AuthzAnswer,
    AuthzRequest,
    CredentialStatus,
    MqttCredentials,
)
from iot_api.problems import NotFound, Unauthorized, problem_responses
from iot_api.services.identity import IdentityService
from iot_api.settings import ApiSettings

HOOK_SECRET_HEADER = "X-Hook-Secret"


def provide_identity(state: State) -> IdentityService:
    identity: IdentityService = state.identity
    return identity


IDENTITY = Provide(provide_identity, sync_to_thread=False)
HookSecret = Annotated[
    str | None,
    HeaderParameter(name=HOOK_SECRET_HEADER, required=False, description="The shared IOT_MQTT_HOOK_SECRET"),
]


class CredentialController(Controller):
    path = "/api/v1/devices/{device_id:str}/credentials"
    tags = ["devices"]
    opt = {"scope": "write"}
    dependencies = {"identity": IDENTITY}

    @post(operation_id="rotateDeviceCredentials", status_code=201, responses=problem_responses(404, 409, 503))
    async def rotate(
        self, identity: NamedDependency[IdentityService], device_id: Annotated[str, PathParameter()]
    ) -> MqttCredentials:
        """Issue a new MQTT secret (shown this once); the previous one stops working."""
        return await identity.rotate(device_id)

    @delete(operation_id="revokeDeviceCredentials", responses=problem_responses(404, 503))
    async def revoke(
        self, identity: NamedDependency[IdentityService], device_id: Annotated[str, PathParameter()]
    ) -> None:
        """Revoke the MQTT credential: connections are refused and an open one is cut."""
        await identity.revoke(device_id)

    @get(operation_id="getDeviceCredentials", opt={"scope": "read"}, responses=problem_responses(404))
    async def status(
        self, identity: NamedDependency[IdentityService], device_id: Annotated[str, PathParameter()]
    ) -> CredentialStatus:
        """Whether the device has an active MQTT credential (never the secret)."""
        return await identity.status(device_id)


def _check_hook_secret(state: State, given: str | None) -> None:
    settings: ApiSettings = state.settings
    if not settings.mqtt_hook_secret:
        raise NotFound("the MQTT hooks are disabled (IOT_MQTT_HOOK_SECRET is not set)")
    if given is None or not hmac.compare_digest(given.encode(), settings.mqtt_hook_secret.encode()):
        raise Unauthorized(f"wrong or missing {HOOK_SECRET_HEADER}")


class MqttHookController(Controller):
    path = "/api/v1/mqtt"
    tags = ["mqtt hooks"]
    opt = {"skip_auth": True}
    dependencies = {"identity": IDENTITY}
    security = [{}]

    @post(
        "/authn",
        operation_id="mqttAuthenticate",
        status_code=200,
        responses=problem_responses(401, 404, public=True),
    )
    async def authenticate(
        self,
        state: State,
        identity: NamedDependency[IdentityService],
        data: JSONBody[AuthnRequest],
        hook_secret: HookSecret = None,
    ) -> AuthnAnswer:
        """EMQX HTTP authentication: may this user name and password connect?"""
        _check_hook_secret(state, hook_secret)
        return await identity.authenticate(data.username, data.password)

    @post(
        "/authz",
        operation_id="mqttAuthorize",
        status_code=200,
        responses=problem_responses(401, 404, public=True),
    )
    async def authorize(
        self,
        state: State,
        identity: NamedDependency[IdentityService],
        data: JSONBody[AuthzRequest],
        hook_secret: HookSecret = None,
    ) -> AuthzAnswer:
        """EMQX HTTP authorisation: may this user publish to or subscribe to this topic?"""
        _check_hook_secret(state, hook_secret)
        return await identity.authorize(data.username, data.action, data.topic)
