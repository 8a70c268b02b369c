"""Commands to devices: stored, published on ``devices/commands/{device_id}`` at QoS 1, then marked sent;
or, for a device whose status is ``offline``, stored ``queued`` for ingest to publish when it comes online.

Order of events: the row is inserted ``pending``; the :class:`~iot_common.messages.CommandMessage` is
published and the broker's PUBACK awaited (see :mod:`iot_api.mqtt` for what that guarantees); the row
becomes ``sent`` and a ``command`` event goes out on the device's Redis channel. When the broker cannot
be reached, or does not acknowledge in time, the row becomes ``failed`` with the reason in ``error``, a
``command`` event says so, and the request is answered 503 (the command is not retried: sending it again
is the client's decision). The device's answer (``acked``/``failed``) and expiry are recorded by ingest.

A ``queued`` command is answered 201 at once with a ``command`` event (state ``queued``); ingest publishes
it when the device's ``online`` status (or a reading) arrives, or expires it at its deadline.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from iot_api.errors import NotFound, Unavailable
from iot_api.events import EventPublisher
from iot_api.mqtt import CommandPublisher, PublishError
from iot_api.pagination import TIME_AND_UUID, paginate
from iot_api.queries import PageRequest
from iot_api.repositories.commands import CommandRepository
from iot_api.schemas.commands import Command, CommandCreate, CommandPage
from iot_api.services.devices import DeviceService, check_json, not_found
from iot_api.tenancy import TenantScope
from iot_common.commands import command_event, command_message
from iot_common.messages import CommandEvent
from iot_common.topics import command_topic

RETRY_AFTER_S = 5


def _event(command: Command) -> CommandEvent:
    return command_event(msgspec.structs.asdict(command))


class CommandService:
    def __init__(
        self,
        repo: CommandRepository,
        devices: DeviceService,
        publisher: CommandPublisher,
        events: EventPublisher,
        default_ttl_s: int,
    ) -> None:
        self.repo = repo
        self.devices = devices
        self.publisher = publisher
        self.events = events
        self.default_ttl_s = default_ttl_s

    async def send(self, tenant: TenantScope, device_id: str, data: CommandCreate) -> Command:
        """Send a command to a device of the tenant (404 for another tenant's, as for an unknown one)."""
        check_json(data.params, "params")
        await self.devices.require(tenant, device_id)
        ttl_s = data.ttl_s or self.default_ttl_s

        async def announce(queued: Command) -> None:
            # Before the commit: ingest's flush, which waits for it, publishes ``sent`` after this.
            await self.events.device_event(tenant.tenant_id, device_id, _event(queued))

        command = await self.repo.create(tenant.tenant_id, device_id, data.name, data.params, ttl_s, announce)
        if command is None:
            raise not_found(device_id)
        if command.state == "queued":
            return command
        message = command_message(command.id, command.name, command.params, command.expires_at)
        try:
            await self.publisher.publish(command_topic(device_id), message, ttl_s)
        except PublishError as exc:
            failed = await self.repo.mark_failed(command.id, str(exc))
            if failed is not None:
                await self.events.device_event(tenant.tenant_id, device_id, _event(failed))
            raise Unavailable(f"command {command.id} failed: {exc}", retry_after_s=RETRY_AFTER_S) from None
        sent = await self.repo.mark_sent(command.id)
        if sent is None:
            # The device answered (and ingest recorded it) before this update: keep its state.
            current = await self.repo.get(tenant.tenant_id, device_id, uuid.UUID(command.id))
            return current or command
        await self.events.device_event(tenant.tenant_id, device_id, _event(sent))
        return sent

    async def get(self, tenant: TenantScope, device_id: str, command_id: uuid.UUID) -> Command:
        command = await self.repo.get(tenant.tenant_id, device_id, command_id)
        if command is None:
            raise NotFound(f"command '{command_id}' of device {device_id!r} not found")
        return command

    async def list(self, tenant: TenantScope, device_id: str, page: PageRequest) -> CommandPage:
        """A device's commands, newest first; :class:`NotFound` when the device is not the tenant's."""

        async def fetch(after: tuple[Any, ...] | None, n: int) -> list[Command]:
            await self.devices.require(tenant, device_id)
            return await self.repo.list(tenant.tenant_id, device_id, after=after, limit=n)

        return await paginate(
            CommandPage, page, TIME_AND_UUID, fetch, lambda command: (command.created_at, command.id)
        )
