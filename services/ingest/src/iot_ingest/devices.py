"""The device cache: which device ids are registered, their types and tenants, and the tenants' limits,
so that a message costs no query.

Auto-registration (``IOT_INGEST_AUTO_REGISTER``) puts a new device in the tenant named by
``IOT_INGEST_AUTO_REGISTER_TENANT``, within that tenant's ``max_devices``: registrations of one tenant
are serialized by a lock on its ``tenants`` row, so replicas registering at once never exceed it; the
devices past the limit are refused (``tenant_quota``) in that tenant's name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import structlog

from iot_ingest import metrics
from iot_ingest.plan import Refusal

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[Any] | PoolConnectionProxy[Any]

log = structlog.stdlib.get_logger(__name__)

LOAD_DEVICES: Final = "SELECT id, type, tenant_id::text FROM devices"
LOAD_TENANTS: Final = "SELECT id::text, name, max_devices, max_readings_per_s FROM tenants"
FIND_DEVICES: Final = "SELECT id, type, tenant_id::text FROM devices WHERE id = ANY($1::text[])"
LOCK_TENANT: Final = "SELECT max_devices FROM tenants WHERE id = $1::uuid FOR NO KEY UPDATE"
"""Serializes registrations into one tenant (FOR NO KEY UPDATE: inserts that only reference the tenant,
whose foreign-key checks take KEY SHARE, are not blocked)."""
COUNT_DEVICES: Final = "SELECT count(*) FROM devices WHERE tenant_id = $1::uuid"
"""Run after :data:`LOCK_TENANT`, as a statement of its own: under READ COMMITTED a statement sees what
was committed before it started, so a count in the locking statement would miss the devices that the
replica it waited for has just registered."""
REGISTER_DEVICES: Final = """
INSERT INTO devices (id, tenant_id) SELECT unnest($1::text[]), $2::uuid ORDER BY 1
ON CONFLICT (id) DO NOTHING RETURNING id
"""


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """A tenant's name and limits (None: no limit)."""

    name: str
    max_devices: int | None = None
    max_readings_per_s: int | None = None


class KnownDevices:
    """Registered devices (type and tenant) and the tenants, cached so that a message costs no query.

    Reloaded in full every ``IOT_INGEST_DEVICE_CACHE_S`` (:meth:`refresh`; devices created, moved or
    deleted through the API, type changes, which alert rules on a device type follow, and tenant limits
    apply then); an id missing from the cache is looked up once per batch before it is refused.
    """

    def __init__(self, auto_register_tenant: str | None = None) -> None:
        self.types: dict[str, str] = {}
        self.tenants: dict[str, str] = {}
        """Device id -> tenant id (text); a device is known when it is here."""
        self.limits: dict[str, TenantLimits] = {}
        """Tenant id -> its name and limits."""
        self.auto_register_tenant = auto_register_tenant
        """Name of the tenant auto-registered devices join (None: no auto-registration)."""
        self.register_into: str | None = None
        """Id of that tenant (None while no tenant has that name)."""
        self._missing_logged = False

    def known(self, device_id: str) -> bool:
        return device_id in self.tenants

    def tenant_name(self, tenant_id: str) -> str:
        limits = self.limits.get(tenant_id)
        return limits.name if limits is not None else tenant_id

    async def load(self, conn: Conn) -> None:
        tenants = {row[0]: TenantLimits(row[1], row[2], row[3]) for row in await conn.fetch(LOAD_TENANTS)}
        rows = await conn.fetch(LOAD_DEVICES)
        # One string object per tenant id, shared by every device of the tenant.
        shared = {tenant_id: tenant_id for tenant_id in tenants}
        self.types = {row[0]: row[1] for row in rows}
        self.tenants = {row[0]: shared.get(row[2], row[2]) for row in rows}
        self.limits = tenants
        self._find_register_tenant()

    def _find_register_tenant(self) -> None:
        if self.auto_register_tenant is None:
            return
        wanted = self.auto_register_tenant.lower()
        found = next((tid for tid, t in self.limits.items() if t.name.lower() == wanted), None)
        if found is None and not self._missing_logged:
            log.error(
                "IOT_INGEST_AUTO_REGISTER_TENANT names no tenant: unknown devices are not registered",
                tenant=self.auto_register_tenant,
            )
        self._missing_logged = found is None
        self.register_into = found

    async def refresh(self, pool: asyncpg.Pool[Any]) -> None:
        """:meth:`load` on a connection of ``pool`` (the periodic job)."""
        async with pool.acquire() as conn:
            await self.load(conn)

    def _remember(self, rows: Iterable[Any]) -> set[str]:
        found = set()
        for row in rows:
            device_id = row[0]
            self.types[device_id] = row[1]
            self.tenants[device_id] = row[2]
            found.add(device_id)
        return found

    def forget(self, device_ids: Iterable[str]) -> None:
        """Drop devices from the cache (registered in a transaction that was rolled back)."""
        for device_id in device_ids:
            self.types.pop(device_id, None)
            self.tenants.pop(device_id, None)

    async def resolve(
        self, conn: Conn, candidates: Iterable[str], register: bool, registered: list[str] | None = None
    ) -> dict[str, Refusal]:
        """Of ``candidates``, the ids whose messages cannot be stored after a look-up (and registration),
        with the reason: ``unknown_device``, or ``tenant_quota`` past the tenant's ``max_devices``.

        The ids this call registers are appended to ``registered`` (to :meth:`forget` them should the
        transaction roll back)."""
        # In order of arrival: past a tenant's device limit, the devices heard from first are registered.
        missing = [d for d in dict.fromkeys(candidates) if d not in self.tenants]
        if not missing:
            return {}
        found = self._remember(await conn.fetch(FIND_DEVICES, missing))
        missing = [d for d in missing if d not in found]
        if not missing:
            return {}
        tenant_id = self.register_into
        if not register or self.auto_register_tenant is None:
            return {d: Refusal("unknown_device", f"device {d!r} is not registered") for d in missing}
        if tenant_id is None:
            detail = f"not registered: no tenant {self.auto_register_tenant!r} to register it in"
            return {d: Refusal("unknown_device", f"device {d!r} is {detail}") for d in missing}
        return await self._register(conn, missing, tenant_id, registered)

    async def _register(
        self, conn: Conn, missing: list[str], tenant_id: str, registered: list[str] | None
    ) -> dict[str, Refusal]:
        refused: dict[str, Refusal] = {}
        row = await conn.fetchrow(LOCK_TENANT, tenant_id)
        if row is None:
            detail = f"not registered: tenant {self.auto_register_tenant!r} no longer exists"
            self.register_into = None
            return {d: Refusal("unknown_device", f"device {d!r} is {detail}") for d in missing}
        max_devices = row[0]
        count = 0 if max_devices is None else await conn.fetchval(COUNT_DEVICES, tenant_id)
        if max_devices is not None and count + len(missing) > max_devices:
            room = max(0, max_devices - count)
            name = self.tenant_name(tenant_id)
            detail = f"device not registered: tenant {name!r} has reached its limit of {max_devices} devices"
            refused = {d: Refusal("tenant_quota", detail, tenant_id) for d in missing[room:]}
            missing = missing[:room]
            log.warning(
                "tenant device limit reached, devices not registered",
                tenant=name,
                max_devices=max_devices,
                device_ids=list(refused)[:20],
                count=len(refused),
            )
        if missing:
            created = await conn.fetch(REGISTER_DEVICES, missing, tenant_id)
            if registered is not None:
                registered += [r[0] for r in created]
            metrics.DEVICES_REGISTERED.inc(len(created))
            if created:
                log.info(
                    "devices registered",
                    device_ids=[r[0] for r in created][:20],
                    count=len(created),
                    tenant=self.tenant_name(tenant_id),
                )
            # Registered by another replica meanwhile (ON CONFLICT): whatever tenant it went to.
            unknown = set(missing) - self._remember(await conn.fetch(FIND_DEVICES, missing))
            refused.update({d: Refusal("unknown_device", f"device {d!r} is not registered") for d in unknown})
        return refused
