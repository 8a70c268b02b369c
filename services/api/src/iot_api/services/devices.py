"""Devices: registration, listing and changes, with the hot reads cached in Redis.

The cache holds a device by id and pages of the device list. A write through the API deletes the
device's entry and bumps the list generation (old pages are no longer looked up and expire). Changes made
by other services (ingest updating ``status``/``last_seen``) show after ``IOT_API_CACHE_TTL_S`` at most.
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec

from iot_api.cache import Cache
from iot_api.errors import Conflict, Invalid, NotFound
from iot_api.pagination import paginate
from iot_api.queries import PageRequest
from iot_api.repositories.devices import DeviceRepository
from iot_api.schemas.devices import Device, DeviceCreate, DevicePage, DeviceUpdate
from iot_common.db.jsonb import unstorable_json

_device_decoder = msgspec.json.Decoder(Device)
_page_decoder = msgspec.json.Decoder(DevicePage)


def check_json(value: Any, path: str) -> None:
    """Refuse what PostgreSQL's jsonb cannot store (NUL characters), naming the place."""
    if problem := unstorable_json(value, path):
        raise Invalid(*problem, "body")


class DeviceService:
    def __init__(self, repo: DeviceRepository, cache: Cache, ttl_s: int) -> None:
        self.repo = repo
        self.cache = cache
        self.ttl_s = ttl_s

    async def get(self, device_id: str) -> Device:
        cached = await self.cache.get(self.cache.key("device", device_id))
        if cached is not None:
            try:
                return _device_decoder.decode(cached)
            except msgspec.DecodeError:
                pass
        device = await self.repo.get(device_id)
        if device is None:
            raise NotFound(f"device {device_id!r} not found")
        await self.cache.set(self.cache.key("device", device_id), msgspec.json.encode(device), self.ttl_s)
        return device

    async def require(self, device_id: str) -> None:
        """Raise :class:`NotFound` unless the device exists (served from the cache when it can be)."""
        await self.get(device_id)

    async def list(
        self, page: PageRequest, *, type_: str | None, status: str | None, search: str | None
    ) -> DevicePage:
        params = msgspec.json.encode([page.limit, page.cursor, type_, status, search]).hex()
        # False: Redis is down (no caching); None: no write yet (generation 0).
        generation: bytes | bool | None = await self.cache.call(
            lambda r: r.get(self.cache.key("devices", "generation")), False
        )
        key = None
        if generation is not False and len(params) < 2000:
            key = self.cache.key("devices", "list", int(generation or 0), params)
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
            lambda after, n: self.repo.list(limit=n, after=after, type_=type_, status=status, search=search),
            lambda device: (device.id,),
        )
        if key is not None:
            await self.cache.set(key, msgspec.json.encode(found), self.ttl_s)
        return found

    async def create(self, data: DeviceCreate) -> Device:
        check_json(data.attributes, "attributes")
        device_id = data.id or f"dev-{secrets.token_hex(8)}"
        device = await self.repo.create(device_id, data.name, data.type, data.attributes)
        if device is None:
            raise Conflict(f"device {device_id!r} already exists")
        await self._invalidate(device_id)
        return device

    async def update(self, device_id: str, data: DeviceUpdate) -> Device:
        changes = {f: getattr(data, f) for f in data.__struct_fields__ if getattr(data, f) is not None}
        if data.attributes is not None:
            check_json(data.attributes, "attributes")
        if not changes:
            return await self.get(device_id)
        device = await self.repo.update(device_id, changes)
        if device is None:
            raise NotFound(f"device {device_id!r} not found")
        await self._invalidate(device_id)
        return device

    async def delete(self, device_id: str) -> None:
        if not await self.repo.delete(device_id):
            raise NotFound(f"device {device_id!r} not found")
        await self._invalidate(device_id)

    async def _invalidate(self, device_id: str) -> None:
        await self.cache.pipeline(
            lambda p: (
                p.delete(self.cache.key("device", device_id)),
                p.incr(self.cache.key("devices", "generation")),
            )
        )
