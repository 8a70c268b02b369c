"""Device state: read it, change the desired side, list the history (docs/device-state.md).

A PATCH is one transaction on the locked ``device_state`` row (``If-Match`` compared there, so of
concurrent conditional patches exactly one wins each version). After the commit the desired message is
published retained on ``devices/state/{device_id}/desired`` (under the device's advisory lock, re-reading
the row, so the retained message never goes back to an older version), and the ``state`` event goes to
Redis (the device's channel and the state copy realtime's ``latest`` reads, both only when newer). When
the broker cannot be reached the change stays committed: the device gets it when it next comes online
(ingest re-publishes) or with the next change; the failure is logged and counted.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from prometheus_client import Counter

from iot_api.cache import Cache
from iot_api.errors import Invalid, PreconditionFailed
from iot_api.mqtt import CommandPublisher, PublishError
from iot_api.pagination import paginate
from iot_api.queries import PageRequest
from iot_api.repositories.state import StateRepository
from iot_api.schemas.state import DeviceStateView, StateHistoryPage, StatePatch
from iot_api.services.devices import DeviceService
from iot_api.tenancy import TenantScope
from iot_common.messages import encode_event
from iot_common.redis_client import copy_state
from iot_common.state import DeviceState, StaleVersion, StateProblem, check_document
from iot_common.topics import RedisNames

log = structlog.stdlib.get_logger(__name__)
DESIRED_PUBLISHED = Counter(
    "iot_api_desired_state_published_total",
    "Desired-state publications after a change, by outcome",
    ["outcome"],
)
_IF_MATCH_RE = re.compile(r'^\s*(?:W/)?"(\d{1,18})"\s*$')


def etag(version: int) -> str:
    return f'"{version}"'


def parse_if_match(header: str | None) -> int | None:
    """The version an ``If-Match: "N"`` header names; None without the header (or ``*``)."""
    if header is None or header.strip() == "*":
        return None
    match = _IF_MATCH_RE.match(header)
    if match is None:
        raise Invalid("If-Match", 'expected a version as an entity tag, e.g. "3"', "header")
    return int(match.group(1))


def view(state: DeviceState) -> DeviceStateView:
    return DeviceStateView(**msgspec.structs.asdict(state))


class StateService:
    def __init__(
        self,
        repo: StateRepository,
        devices: DeviceService,
        publisher: CommandPublisher,
        cache: Cache,
        names: RedisNames,
    ) -> None:
        self.repo = repo
        self.devices = devices
        self.publisher = publisher
        self.cache = cache
        self.names = names

    async def get(self, tenant: TenantScope, device_id: str) -> DeviceState:
        await self.devices.require(tenant, device_id)
        return await self.repo.get(tenant.tenant_id, device_id)

    async def patch(
        self, tenant: TenantScope, device_id: str, data: StatePatch, if_match: str | None
    ) -> DeviceState:
        expected = parse_if_match(if_match)
        _check(data.desired, "desired")
        await self.devices.require(tenant, device_id)
        try:
            state = await self.repo.patch_desired(
                tenant.tenant_id, device_id, data.desired, tenant.actor, datetime.now(UTC), expected
            )
        except StaleVersion as exc:
            raise PreconditionFailed(
                f"If-Match names version {expected}, the state is at version {exc.current}"
            ) from None
        except StateProblem as exc:
            raise Invalid(exc.field, f"after merging: {exc.reason}", "body") from None
        await self._publish(tenant, state)
        return state

    async def _publish(self, tenant: TenantScope, state: DeviceState) -> None:
        async def publish(topic: str, payload: bytes) -> None:
            await self.publisher.publish(topic, payload, retain=True)

        try:
            await self.repo.publish_desired(state.device_id, publish)
            DESIRED_PUBLISHED.labels("acked").inc()
        except PublishError as exc:
            DESIRED_PUBLISHED.labels("failed").inc()
            log.warning(
                "desired state stored but not published; the device gets it when it comes online",
                device_id=state.device_id,
                version=state.version,
                error=str(exc),
            )
        await store_state_copy(self.cache, self.names, str(tenant.tenant_id), state)

    async def forget(self, device_id: str) -> None:
        """After the device's deletion: its retained desired message is removed (best effort, logged)."""

        async def publish(topic: str, payload: bytes) -> None:
            await self.publisher.publish(topic, payload, retain=True)

        try:
            await self.repo.clear_desired(device_id, publish)
        except PublishError as exc:
            log.warning(
                "device deleted but its retained desired state could not be removed",
                device_id=device_id,
                error=str(exc),
            )

    async def history(self, tenant: TenantScope, device_id: str, page: PageRequest) -> StateHistoryPage:
        async def fetch(after: tuple[Any, ...] | None, n: int) -> list[Any]:
            await self.devices.require(tenant, device_id)
            return await self.repo.history(tenant.tenant_id, device_id, after=after, limit=n)

        return await paginate(StateHistoryPage, page, (int,), fetch, lambda change: (change.version,))


def _check(doc: dict[str, Any], field: str) -> None:
    try:
        check_document(doc, field)
    except StateProblem as exc:
        raise Invalid(exc.field, exc.reason, "body") from None


async def store_state_copy(cache: Cache, names: RedisNames, tenant_id: str, state: DeviceState) -> bool:
    """The ``state`` event on the device's channel and in the Redis copy, unless a newer one is there;
    False when Redis could not be reached (the change is stored either way)."""
    payload = encode_event(state.event())
    result = await cache.call(
        lambda r: copy_state(r, names, tenant_id, state.device_id, state.version, payload), None
    )
    return result is not None
