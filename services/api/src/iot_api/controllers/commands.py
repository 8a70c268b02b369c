"""``/api/v1/devices/{device_id}/commands``: send a command to a device, follow its state."""

from __future__ import annotations

from litestar import Controller, Response, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from iot_api.controllers.params import PAGE, CommandId, DeviceIdPath
from iot_api.problems import problem_responses
from iot_api.queries import PageRequest
from iot_api.schemas.commands import Command, CommandCreate, CommandPage
from iot_api.state import AppServices
from iot_api.tenancy import Tenant


class CommandController(Controller):
    path = "/api/v1/devices/{device_id:str}/commands"
    tags = ["commands"]
    opt = {"permission": "read"}
    dependencies = {"page": PAGE}

    @post("/", operation_id="sendCommand", permission="operate", responses=problem_responses(404, 413, 503))
    async def send_command(
        self, services: AppServices, tenant: Tenant, device_id: DeviceIdPath, data: JSONBody[CommandCreate]
    ) -> Response[Command]:
        """Publish a command on ``devices/commands/{device_id}`` (QoS 1); 201 once the broker acknowledged
        it (state ``sent``), 503 when the broker could not be reached (the command is kept as ``failed``).
        For a device whose status is ``offline``: 201 with state ``queued``, published when the device
        comes online, or ``expired`` after ``ttl_s``."""
        command = await services.commands.send(tenant, device_id, data)
        location = f"/api/v1/devices/{device_id}/commands/{command.id}"
        return Response(command, status_code=201, headers={"Location": location})

    @get("/", operation_id="listCommands", responses=problem_responses(404))
    async def list_commands(
        self,
        services: AppServices,
        tenant: Tenant,
        device_id: DeviceIdPath,
        page: NamedDependency[PageRequest],
    ) -> CommandPage:
        """A device's commands, newest first."""
        return await services.commands.list(tenant, device_id, page)

    @get("/{command_id:str}", operation_id="getCommand", responses=problem_responses(404))
    async def get_command(
        self, services: AppServices, tenant: Tenant, device_id: DeviceIdPath, command_id: CommandId
    ) -> Command:
        return await services.commands.get(tenant, device_id, command_id)
