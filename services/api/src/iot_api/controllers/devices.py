"""``/api/v1/devices`` and its alias ``/api/v1/device/list``."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromQuery, JSONBody, PathParameter, QueryParameter

from iot_api.controllers.deps import DEVICES
from iot_api.controllers.identity import IDENTITY
from iot_api.identity_schemas import DeviceCreated
from iot_api.problems import problem_responses
from iot_api.schemas import Device, DeviceCreate, DevicePage, DeviceUpdate
from iot_api.services.devices import DeviceService
from iot_api.services.identity import IdentityService
from iot_common.messages import DeviceStatus

Limit = Annotated[int, QueryParameter(ge=1, le=500, description="Page size (1-500)")]
Cursor = Annotated[
    str | None,
    QueryParameter(max_length=512, description="`next_cursor` of the previous page", required=False),
]
TypeFilter = Annotated[
    str | None,
    QueryParameter(
        name="type", pattern=r"^[A-Za-z0-9_.:-]{1,64}(?!\n)$", description="Only devices of this type"
    ),
]
Search = Annotated[
    str | None,
    QueryParameter(
        max_length=200, pattern=r"^[^\x00]*$", description="Case-insensitive substring of name or id"
    ),
]


class DeviceController(Controller):
    path = "/api/v1"
    tags = ["devices"]
    opt = {"scope": "read"}
    dependencies = {"devices": DEVICES, "identity": IDENTITY}

    async def _list(
        self,
        devices: NamedDependency[DeviceService],
        limit: int,
        cursor: str | None,
        type_: str | None,
        status: DeviceStatus | None,
        q: str | None,
    ) -> DevicePage:
        return await devices.list(limit=limit, cursor=cursor, type_=type_, status=status, search=q)

    @get("/devices", operation_id="listDevices", responses=problem_responses())
    async def list_devices(
        self,
        devices: NamedDependency[DeviceService],
        type_: TypeFilter = None,
        limit: Limit = 50,
        cursor: Cursor = None,
        status: FromQuery[DeviceStatus | None] = None,
        q: Search = None,
    ) -> DevicePage:
        """Devices ordered by id, filtered by type, status and a search on name or id."""
        return await self._list(devices, limit, cursor, type_, status, q)

    @get("/device/list", operation_id="listDevicesAlias", responses=problem_responses())
    async def list_devices_alias(
        self,
        devices: NamedDependency[DeviceService],
        type_: TypeFilter = None,
        limit: Limit = 50,
        cursor: Cursor = None,
        status: FromQuery[DeviceStatus | None] = None,
        q: Search = None,
    ) -> DevicePage:
        """Same as ``GET /api/v1/devices`` (the path the platform's data-flow document names)."""
        return await self._list(devices, limit, cursor, type_, status, q)

    @post(
        "/devices",
        operation_id="createDevice",
        opt={"scope": "write"},
        responses=problem_responses(409, 413, 503),
    )
    async def create_device(
        self, identity: NamedDependency[IdentityService], data: JSONBody[DeviceCreate]
    ) -> DeviceCreated:
        """Register a device; 409 when the id is taken. ``mqtt`` holds its MQTT credentials, shown once."""
        return await identity.register(data)

    @get("/devices/{device_id:str}", operation_id="getDevice", responses=problem_responses(404))
    async def get_device(
        self, devices: NamedDependency[DeviceService], device_id: Annotated[str, PathParameter()]
    ) -> Device:
        return await devices.get(device_id)

    @patch(
        "/devices/{device_id:str}",
        operation_id="updateDevice",
        opt={"scope": "write"},
        responses=problem_responses(404, 413),
    )
    async def update_device(
        self,
        devices: NamedDependency[DeviceService],
        device_id: Annotated[str, PathParameter()],
        data: JSONBody[DeviceUpdate],
    ) -> Device:
        return await devices.update(device_id, data)

    @delete(
        "/devices/{device_id:str}",
        operation_id="deleteDevice",
        opt={"scope": "write"},
        responses=problem_responses(404, 503),
    )
    async def delete_device(
        self, identity: NamedDependency[IdentityService], device_id: Annotated[str, PathParameter()]
    ) -> None:
        """Delete the device and its MQTT credentials (its telemetry stays until retention drops it)."""
        await identity.delete_device(device_id)
