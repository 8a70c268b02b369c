"""The API's admin connection to Mosquitto's dynamic security plugin (``IOT_MQTT_ADMIN_URL``).

One :class:`~iot_api.dynsec.DynsecAdmin` is held for the life of the app. When it is not connected
(broker restarted, network cut) the next call opens a fresh one; when that fails the call raises
:class:`BrokerUnavailable`, which the identity service turns into a 503 after rolling back its change.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import Counter

from iot_api.dynsec import DynsecAdmin, DynsecError, device_role
from iot_api.errors import Conflict, Unavailable

log = structlog.stdlib.get_logger("iot_api.broker")
BROKER_CALLS = Counter("iot_api_broker_calls_total", "Dynamic-security commands by result", ["result"])
RETRY_AFTER_S = 5


class BrokerUnavailable(Unavailable):
    """The MQTT broker did not answer; nothing was changed."""


class DynsecProvisioner:
    """Provision, disable and delete device users on Mosquitto, reconnecting when needed."""

    def __init__(self, admin_url: str, timeout_s: float = 5.0) -> None:
        self._url = admin_url
        self._timeout_s = timeout_s
        self._admin: DynsecAdmin | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Connect now if the broker answers; a broker that does not is retried on first use."""
        with contextlib.suppress(BrokerUnavailable):
            await self._connected()

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.close()
            self._admin = None

    async def _connected(self) -> DynsecAdmin:
        async with self._lock:
            if self._admin is not None and self._admin.connected:
                return self._admin
            await self.close()
            admin = DynsecAdmin(self._url, timeout=self._timeout_s, reconnect=False)
            try:
                await asyncio.wait_for(admin.connect(), self._timeout_s)
            except Exception as exc:
                await admin.close()
                log.warning("dynsec admin cannot connect", error=f"{type(exc).__name__}: {exc}")
                raise BrokerUnavailable(
                    "the MQTT broker is unavailable; nothing was changed, retry later",
                    retry_after_s=RETRY_AFTER_S,
                ) from None
            self._admin = admin
            log.info("dynsec admin connected")
            return admin

    async def _call(self, what: str, device_id: str, password: str | None = None) -> None:
        admin = await self._connected()
        try:
            if what == "provision":
                assert password is not None
                await self._refuse_foreign_user(admin, device_id)
                await admin.provision_device(device_id, password)
            elif what == "disable":
                await admin.disable_device(device_id)
            else:
                await admin.delete_device(device_id)
        except DynsecError:
            BROKER_CALLS.labels("refused").inc()
            raise
        except (TimeoutError, OSError, ConnectionError) as exc:
            BROKER_CALLS.labels("unavailable").inc()
            log.warning("dynsec command failed", command=what, error=f"{type(exc).__name__}: {exc}")
            await self.close()
            raise BrokerUnavailable(
                "the MQTT broker did not answer; the change was rolled back, retry later",
                retry_after_s=RETRY_AFTER_S,
            ) from None
        BROKER_CALLS.labels("ok").inc()

    @staticmethod
    async def _refuse_foreign_user(admin: DynsecAdmin, device_id: str) -> None:
        """409 when the broker has a user of that name that is not this device's (a service user)."""
        answers = await admin.run({"command": "getClient", "username": device_id}, ignore=("not found",))
        client = (answers[0].get("data") or {}).get("client") if answers else None
        if client is None:
            return
        roles = {r.get("rolename") for r in client.get("roles", [])}
        if roles != {device_role(device_id)}:
            raise Conflict(f"MQTT user {device_id!r} exists on the broker and is not this device's")

    async def provision_many(
        self, devices: list[tuple[str, str]], progress: Callable[[int], None] | None = None
    ) -> list[str]:
        """Provision many new devices (an import) in batched messages (``progress``: the devices sent so
        far, after each); a user that exists already is checked and re-keyed like :meth:`provision`.
        Returns the ids whose users this call created; when it raises (like :meth:`provision`), it has
        tried to delete them again."""
        admin = await self._connected()
        existing: set[str] = set()
        try:
            existing = set(await admin.create_devices(devices, progress=progress))
            for device_id, password in devices:
                if device_id in existing:
                    await self._refuse_foreign_user(admin, device_id)
                    await admin.provision_device(device_id, password)
        except BaseException as exc:
            await self.delete_many([d for d, _ in devices if d not in existing])
            if isinstance(exc, DynsecError):
                BROKER_CALLS.labels("refused").inc()
            if isinstance(exc, TimeoutError | OSError | ConnectionError):
                BROKER_CALLS.labels("unavailable").inc()
                log.warning(
                    "dynsec import failed", devices=len(devices), error=f"{type(exc).__name__}: {exc}"
                )
                await self.close()
                raise BrokerUnavailable(
                    "the MQTT broker did not answer; the import was rolled back, retry later",
                    retry_after_s=RETRY_AFTER_S,
                ) from None
            raise
        BROKER_CALLS.labels("ok").inc()
        return [d for d, _ in devices if d not in existing]

    async def delete_many(self, device_ids: list[str]) -> None:
        """Best effort: remove the users and roles of devices whose import was rolled back."""
        with contextlib.suppress(Exception):
            admin = await self._connected()
            for start in range(0, len(device_ids), 200):
                commands: list[dict[str, Any]] = []
                for device_id in device_ids[start : start + 200]:
                    commands.append({"command": "deleteClient", "username": device_id})
                    commands.append({"command": "deleteRole", "rolename": device_role(device_id)})
                await admin.run(*commands, ignore=("not found",), timeout=120.0)

    async def provision(self, device_id: str, password: str) -> None:
        await self._call("provision", device_id, password)

    async def disable(self, device_id: str) -> None:
        await self._call("disable", device_id)

    async def delete(self, device_id: str) -> None:
        await self._call("delete", device_id)
