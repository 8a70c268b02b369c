"""``/api/v1/devices/{device_id}/state``: a device's desired and reported state, and its history."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Response, get, patch
from litestar.di import NamedDependency
from litestar.params import HeaderParameter, JSONBody

from iot_api.controllers.params import PAGE, DeviceIdPath
from iot_api.problems import problem_responses
from iot_api.queries import PageRequest
from iot_api.schemas.state import DeviceStateView, StateHistoryPage, StatePatch
from iot_api.services.state import etag, view
from iot_api.state import AppServices
from iot_api.tenancy import Tenant

IfMatch = Annotated[
    str | None,
    HeaderParameter(
        name="If-Match",
        max_length=64,
        description='The version the change is based on, as the ETag gives it (`"3"`); 412 when stale',
    ),
]


class StateController(Controller):
    path = "/api/v1/devices/{device_id:str}/state"
    tags = ["state"]
    opt = {"permission": "read"}
    dependencies = {"page": PAGE}

    @get("/", operation_id="getDeviceState", responses=problem_responses(404))
    async def get_state(
        self, services: AppServices, tenant: Tenant, device_id: DeviceIdPath
    ) -> Response[DeviceStateView]:
        """The device's desired and reported state, their delta and the version (also the `ETag`)."""
        state = await services.state.get(tenant, device_id)
        return Response(view(state), headers={"ETag": etag(state.version)})

    @patch(
        "/",
        operation_id="patchDesiredState",
        permission="operate",
        responses=problem_responses(404, 412, 413),
    )
    async def patch_state(
        self,
        services: AppServices,
        tenant: Tenant,
        device_id: DeviceIdPath,
        data: JSONBody[StatePatch],
        if_match: IfMatch = None,
    ) -> Response[DeviceStateView]:
        """Merge `desired` (RFC 7386: `null` removes a key) into the desired state, then publish it to the
        device on `devices/state/{device_id}/desired` (retained, QoS 1). With `If-Match`, only if the state
        is still at that version (412 otherwise, nothing changed)."""
        state = await services.state.patch(tenant, device_id, data, if_match)
        return Response(view(state), headers={"ETag": etag(state.version)})

    @get("/history", operation_id="listDeviceStateHistory", responses=problem_responses(404))
    async def history(
        self,
        services: AppServices,
        tenant: Tenant,
        device_id: DeviceIdPath,
        page: NamedDependency[PageRequest],
    ) -> StateHistoryPage:
        """Changes of the device's state, newest first: who changed desired, what the device reported."""
        return await services.state.history(tenant, device_id, page)
