"""Devices: registration, listing and changes, with the hot reads cached in Redis, per tenant.

The cache holds a device by (tenant, id) and pages of each tenant's device list. A write through the API
deletes the device's entry and bumps the tenant's list generation (its old pages are no longer looked up
and expire). Changes made by other services (ingest updating ``status``/``last_seen``) show after
``IOT_API_CACHE_TTL_S`` at most.
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec
import structlog

from iot_api.cache import Cache
from iot_api.errors import Conflict, Invalid, NotFound
from iot_api.pagination import paginate
from iot_api.queries import PageRequest
from iot_api.repositories.devices import DeviceLimitReached, DeviceRepository
from iot_api.schemas.devices import Device, DeviceCreate, DevicePage, DeviceUpdate
from iot_api.tenancy import TenantScope
from iot_common.db.jsonb import unstorable_json
from iot_common.topics import RedisNames

log = structlog.stdlib.get_logger("iot_api.devices")

_device_decoder = msgspec.json.Decoder(Device)
_page_decoder = msgspec.json.Decoder(DevicePage)


def check_json(value: Any, path: str) -> None:
    """Refuse what PostgreSQL's jsonb cannot store (NUL characters), naming the place."""
    if problem := unstorable_json(value, path):
        raise Invalid(*problem, "body")


def not_found(device_id: str) -> NotFound:
    """The refusal for a device that does not exist, or is another tenant's: the same."""
    return NotFound(f"device {device_id!r} not found")


class DeviceService:
    def __init__(self, repo: DeviceRepository, cache: Cache, ttl_s: int, names: RedisNames) -> None:
        self.repo = repo
        self.cache = cache
        self.ttl_s = ttl_s
        self.names = names

    def device_key(self, tenant: TenantScope, device_id: str) -> str:
        """The cache entry of a device of the tenant (no entry is shared between tenants)."""
        return self.cache.key("device", tenant.tenant_id.hex, device_id)

    def _generation_key(self, tenant: TenantScope) -> str:
        return self.cache.key("devices", tenant.tenant_id.hex, "generation")

    async def get(self, tenant: TenantScope, device_id: str) -> Device:
        key = self.device_key(tenant, device_id)
        cached = await self.cache.get(key)
        if cached is not None:
            try:
                return _device_decoder.decode(cached)
            except msgspec.DecodeError:
                pass
        device = await self.repo.get(tenant.tenant_id, device_id)
        if device is None:
            raise not_found(device_id)
        await self.cache.set(key, msgspec.json.encode(device), self.ttl_s)
        return device

    async def require(self, tenant: TenantScope, device_id: str) -> None:
        """Raise :class:`NotFound` unless the device is the tenant's (from the cache when it can be)."""
        await self.get(tenant, device_id)

    async def owned_of(
        self, tenant: TenantScope, device_ids: list[str], cached: list[bytes | None]
    ) -> set[str]:
        """Those of ``device_ids`` that are the tenant's; ``cached``: their cache entries (from
        :meth:`device_key`, fetched by the caller with its other reads), None where missing."""
        owned = {d for d, entry in zip(device_ids, cached, strict=True) if entry is not None}
        missing = [d for d in device_ids if d not in owned]
        if missing:
            found = await self.repo.get_many(tenant.tenant_id, missing)
            owned |= {device.id for device in found}
            entries = [(self.device_key(tenant, d.id), msgspec.json.encode(d)) for d in found]
            if entries:
                await self.cache.pipeline(lambda p: [p.set(k, v, ex=self.ttl_s) for k, v in entries])
        return owned

    async def list(
        self,
        tenant: TenantScope,
        page: PageRequest,
        *,
        type_: str | None,
        status: str | None,
        search: str | None,
    ) -> DevicePage:
        params = msgspec.json.encode([page.limit, page.cursor, type_, status, search]).hex()
        # False: Redis is down (no caching); None: no write yet (generation 0).
        generation_key = self._generation_key(tenant)
        generation: bytes | bool | None = await self.cache.call(lambda r: r.get(generation_key), False)
        key = None
        if generation is not False and len(params) < 2000:
            key = self.cache.key("devices", tenant.tenant_id.hex, "list", int(generation or 0), params)
        if key is not None:
            cached = await self.cache.get(key)
            if cached is not None:
                try:
                    return _page_decoder.decode(cached)
                except msgspec.DecodeError:
                    pass
        found = await paginate(
            DevicePage,
            page,
            (str,),
            lambda after, n: self.repo.list(
                tenant.tenant_id, limit=n, after=after, type_=type_, status=status, search=search
            ),
            lambda device: (device.id,),
        )
        if key is not None:
            await self.cache.set(key, msgspec.json.encode(found), self.ttl_s)
        return found

    async def create(self, tenant: TenantScope, data: DeviceCreate) -> Device:
        """A new device of the tenant; 409 when the id is taken (by any tenant: the answer does not say
        which) or the tenant's ``max_devices`` is reached."""
        check_json(data.attributes, "attributes")
        device_id = data.id or f"dev-{secrets.token_hex(8)}"
        try:
            device = await self.repo.create(
                tenant.tenant_id, device_id, data.name, data.type, data.attributes
            )
        except DeviceLimitReached as exc:
            raise Conflict(
                f"the tenant's device limit is reached ({exc.limit} devices, max_devices)"
            ) from None
        if device is None:
            raise Conflict(f"device {device_id!r} already exists")
        await self._invalidate(tenant, device_id)
        return device

    async def update(self, tenant: TenantScope, device_id: str, data: DeviceUpdate) -> Device:
        changes = {f: getattr(data, f) for f in data.__struct_fields__ if getattr(data, f) is not None}
        if data.attributes is not None:
            check_json(data.attributes, "attributes")
        if not changes:
            return await self.get(tenant, device_id)
        device = await self.repo.update(tenant.tenant_id, device_id, changes)
        if device is None:
            raise not_found(device_id)
        await self._invalidate(tenant, device_id)
        return device

    async def delete(self, tenant: TenantScope, device_id: str) -> None:
        """Delete the device with its telemetry, latest values and state copy (a later device with this
        id, of any tenant, starts with no history)."""
        if not await self.repo.delete(tenant.tenant_id, device_id):
            raise not_found(device_id)
        await self._invalidate(tenant, device_id)
        if not await self.cache.delete(self.names.latest_key(device_id), self.names.state_key(device_id)):
            log.warning(
                "device deleted but its latest values and state copy could not be deleted",
                device_id=device_id,
            )

    async def invalidate_list(self, tenant: TenantScope) -> None:
        """Pages of the tenant's device list cached before a change are no longer read."""
        await self.cache.pipeline(lambda p: p.incr(self._generation_key(tenant)))

    async def _invalidate(self, tenant: TenantScope, device_id: str) -> None:
        await self.cache.pipeline(
            lambda p: (p.delete(self.device_key(tenant, device_id)), p.incr(self._generation_key(tenant)))
        )
