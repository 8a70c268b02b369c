"""Publications on Redis pub/sub: device events for the realtime service, rule changes for ingest.

Like the cache, a Redis outage does not fail the request that caused the publication: the change is
stored in PostgreSQL already; a dashboard misses the live update and ingest picks the rules up on its
next reload.
"""

from __future__ import annotations

import uuid

import msgspec

from iot_api.cache import Cache
from iot_common.messages import DeviceEvent, encode_event
from iot_common.redis_client import publish_device_events
from iot_common.topics import RedisNames


class RuleChange(msgspec.Struct, frozen=True):
    """Body of a message on ``{prefix}:rules-changed``: which rule changed and how (ingest reloads all)."""

    rule_id: str
    change: str


class EventPublisher:
    def __init__(self, cache: Cache, names: RedisNames) -> None:
        self.cache = cache
        self.names = names

    async def device_event(self, tenant_id: uuid.UUID | str, device_id: str, event: DeviceEvent) -> bool:
        """Publish ``event`` on the device's channel (``tenant_id``: the tenant owning the device, whose
        WebSocket clients alone see it); False when Redis could not be reached."""
        events = [(tenant_id, device_id, encode_event(event))]
        result = await self.cache.call(lambda r: publish_device_events(r, self.names, events), False)
        return result is not False

    async def rules_changed(self, rule_id: str, change: str) -> bool:
        """Tell every ingest replica to reload the rules; False when Redis could not be reached."""
        payload = msgspec.json.encode(RuleChange(rule_id, change))
        result = await self.cache.call(lambda r: r.publish(self.names.rules_changed, payload), None)
        return result is not None
