"""Provisioning device identities on Mosquitto through its dynamic security plugin.

An admin client publishes commands to ``$CONTROL/dynamic-security/v1`` and reads the answers on
``.../response``. Each device gets a user named after its id and a role ``device-{id}`` that lets it
publish only its own telemetry, status and command answers, and subscribe only to its own commands.
Disabling or deleting the user also disconnects a device that is connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Callable
from typing import Any

import gmqtt
import msgspec

from iot_common.mqtt import MqttEndpoint
from iot_common.topics import (
    command_ack_topic,
    command_topic,
    state_desired_topic,
    state_reported_topic,
    status_topic,
    telemetry_topic,
)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"


class DynsecError(RuntimeError):
    """The broker refused a dynamic-security command; the message is the broker's."""


def device_role(device_id: str) -> str:
    return f"device-{device_id}"


def device_acls(device_id: str) -> list[dict[str, Any]]:
    """What a device may do: publish its telemetry, status, command answers and state reports; read its
    commands and its desired state."""
    allow = [
        ("publishClientSend", telemetry_topic(device_id)),
        ("publishClientSend", status_topic(device_id)),
        ("publishClientSend", command_ack_topic(device_id)),
        ("publishClientSend", state_reported_topic(device_id)),
        ("subscribeLiteral", command_topic(device_id)),
        ("publishClientReceive", command_topic(device_id)),
        ("subscribeLiteral", state_desired_topic(device_id)),
        ("publishClientReceive", state_desired_topic(device_id)),
    ]
    return [{"acltype": kind, "topic": topic, "priority": 0, "allow": True} for kind, topic in allow]


class DynsecAdmin:
    """An MQTT admin client of the dynamic security plugin (one command batch at a time)."""

    def __init__(self, mqtt_url: str, timeout: float = 5.0, reconnect: bool = True) -> None:
        """``reconnect=False``: a dropped connection stays down (the owner opens a new client), since
        gmqtt's own reconnection would not renew the subscription to the answers."""
        self._endpoint = MqttEndpoint.parse(mqtt_url)
        self._timeout = timeout
        self._client = gmqtt.Client(f"iot-dynsec-{uuid.uuid4().hex[:12]}")
        if not reconnect:
            self._client.set_config({"reconnect_retries": 0})
        self._client.on_message = self._on_message
        self._pending: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}
        self._ids = itertools.count()
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        self._endpoint.authenticate(self._client)
        await self._endpoint.connect(self._client)
        subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_subscribe(*_: Any) -> None:
            if not subscribed.done():
                subscribed.set_result(None)

        self._client.on_subscribe = on_subscribe
        self._client.subscribe(RESPONSE_TOPIC, qos=1)
        await asyncio.wait_for(subscribed, self._timeout)

    @property
    def connected(self) -> bool:
        return bool(self._client.is_connected)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.disconnect()

    async def _on_message(self, _c: Any, _topic: str, payload: bytes, _qos: int, _p: Any) -> int:
        answers = msgspec.json.decode(payload).get("responses", [])
        by_batch: dict[str, list[dict[str, Any]]] = {}
        for answer in answers:
            batch = str(answer.get("correlationData", "")).split(":")[0]
            by_batch.setdefault(batch, []).append(answer)
        for batch, items in by_batch.items():
            future = self._pending.pop(batch, None)
            if future is not None and not future.done():
                future.set_result(items)
        return 0

    async def run(
        self, *commands: dict[str, Any], ignore: tuple[str, ...] = (), timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """Send commands in one message; raise :class:`DynsecError` unless each succeeded or its
        error contains one of ``ignore`` (e.g. "already exists"). ``timeout``: for the answer, instead of
        the client's."""
        async with self._lock:
            batch = f"b{next(self._ids)}"
            tagged = [{**c, "correlationData": f"{batch}:{i}"} for i, c in enumerate(commands)]
            future: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
            self._pending[batch] = future
            self._client.publish(CONTROL_TOPIC, msgspec.json.encode({"commands": tagged}), qos=1)
            try:
                answers = await asyncio.wait_for(future, timeout or self._timeout)
            finally:
                self._pending.pop(batch, None)
        for answer in answers:
            error = answer.get("error")
            if error and not any(part in error for part in ignore):
                raise DynsecError(f"{answer.get('command')}: {error}")
        return answers

    async def provision_device(self, device_id: str, password: str) -> None:
        """Create (or re-enable and re-key) the device's user and its role."""
        role = device_role(device_id)
        await self.run(
            {"command": "createRole", "rolename": role, "acls": device_acls(device_id)},
            {
                "command": "createClient",
                "username": device_id,
                "password": password,
                "roles": [{"rolename": role}],
            },
            ignore=("already exists",),
        )
        # A role created by an older version lacks the ACLs added since (device state): add what is
        # missing; those it has are answered "already exists".
        await self.run(
            *({"command": "addRoleACL", "rolename": role, **acl} for acl in device_acls(device_id)),
            ignore=("already exists",),
        )
        # An existing user keeps its old password unless it is set again.
        await self.run(
            {"command": "setClientPassword", "username": device_id, "password": password},
            {"command": "enableClient", "username": device_id},
        )

    async def create_devices(
        self,
        devices: list[tuple[str, str]],
        batch: int = 200,
        timeout: float = 120.0,
        progress: Callable[[int], None] | None = None,
    ) -> list[str]:
        """Create the users and roles of many new devices (id, password), ``batch`` devices per message;
        ``progress`` is told the number of devices sent so far after each answered message.

        Returns the ids whose user existed already (left unchanged: the caller checks and re-keys them one
        by one). Mosquitto's plugin saves its whole file after every command, so each command costs time
        in proportion to the number of users already there (see docs/device-identity.md).
        """
        existing: list[str] = []
        for start in range(0, len(devices), batch):
            commands: list[dict[str, Any]] = []
            for device_id, password in devices[start : start + batch]:
                role = device_role(device_id)
                commands.append({"command": "createRole", "rolename": role, "acls": device_acls(device_id)})
                commands.append(
                    {
                        "command": "createClient",
                        "username": device_id,
                        "password": password,
                        "roles": [{"rolename": role}],
                    }
                )
            answers = await self.run(*commands, ignore=("already exists",), timeout=timeout)
            for answer in answers:
                index = int(str(answer.get("correlationData", ":0")).split(":")[1])
                if answer.get("error") and commands[index]["command"] == "createClient":
                    existing.append(str(commands[index]["username"]))
            if progress is not None:
                progress(min(start + batch, len(devices)))
        return existing

    async def disable_device(self, device_id: str) -> None:
        """Refuse the device's future connections and disconnect the current one."""
        await self.run({"command": "disableClient", "username": device_id}, ignore=("not found",))

    async def delete_device(self, device_id: str) -> None:
        await self.run(
            {"command": "deleteClient", "username": device_id},
            {"command": "deleteRole", "rolename": device_role(device_id)},
            ignore=("not found",),
        )

    async def ensure_service_user(self, username: str, password: str, acls: list[dict[str, Any]]) -> None:
        """A platform service's own user (ingest, API) with its role ``service-{username}``."""
        role = f"service-{username}"
        await self.run(
            {"command": "createRole", "rolename": role, "acls": acls},
            {
                "command": "createClient",
                "username": username,
                "password": password,
                "roles": [{"rolename": role}],
            },
            ignore=("already exists",),
        )
