"""A tenant's limit on readings per second (``tenants.max_readings_per_s``), one count for all replicas.

Each ingest replica gets a share of every tenant's messages from the broker's shared subscription, and
that share is not even (one busy device is all on one replica at a time, replicas come and go), so a
bucket per replica sized to limit/replicas would refuse too much on one replica and too little overall.
Instead the replicas count together in Redis: one counter per tenant and second,
``{prefix}:ingest:tenant-rate:{tenant_id}:{epoch second}``. For each batch, the writer sums the readings
of each tenant that has a limit, adds them with ``INCRBY`` (and ``EXPIRE``, so old seconds vanish): one
pipeline per batch, and none for a batch without a limited tenant. ``INCRBY`` answers the count with
this batch; minus the batch's own readings, that is what the tenant used this second before it. The
batch's messages are then admitted in arrival order while they fit in what is left; a message is
admitted or refused whole (a refused one is a ``tenant_quota`` dead letter naming the tenant and limit).

Fixed windows of one second of the replicas' clocks: within any second of the clock a tenant never gets
more than its limit stored, but across a window boundary it may get up to twice its limit in a second.
Refused readings count too (they were asked for), which only matters in a second already over the limit.

When Redis does not answer within its socket timeout, the batch is stored unchecked (fail open: readings
matter more than the limit), counted in ``iot_ingest_tenant_quota_unchecked_total``, and Redis is not
asked again for :data:`RETRY_AFTER_S`, so an outage costs at most one timeout per that time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Final

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from iot_common.redis_client import create_redis
from iot_common.topics import RedisNames
from iot_ingest import metrics
from iot_ingest.devices import KnownDevices, TenantLimits
from iot_ingest.payload import Reject
from iot_ingest.plan import Delivery

log = structlog.stdlib.get_logger(__name__)

WINDOW_TTL_S: Final = 5
"""Lifetime of a second's counter in Redis: long enough for a replica whose clock is a little behind."""
RETRY_AFTER_S: Final = 1.0
TIMEOUT_S: Final = 0.5
"""Socket timeout of the quota's Redis client (``redis_client`` in :func:`quota_client`)."""


def demand(
    batch: list[Delivery], tenants: Mapping[str, str], limits: Mapping[str, TenantLimits]
) -> dict[str, int]:
    """Readings of ``batch`` per tenant that has a readings limit (devices not in ``tenants``: none)."""
    wanted: dict[str, int] = {}
    for delivery in batch:
        if not delivery.readings or delivery.device_id is None:
            continue
        tenant_id = tenants.get(delivery.device_id)
        if tenant_id is None:
            continue
        tenant = limits.get(tenant_id)
        if tenant is not None and tenant.max_readings_per_s is not None:
            wanted[tenant_id] = wanted.get(tenant_id, 0) + len(delivery.readings)
    return wanted


def admit(
    batch: list[Delivery],
    tenants: Mapping[str, str],
    limits: Mapping[str, TenantLimits],
    used: Mapping[str, int],
) -> list[Delivery]:
    """``batch``, with each message that does not fit in what its tenant has left this second replaced
    by a ``tenant_quota`` refusal; ``used`` is what each limited tenant used this second before the batch.

    Messages of tenants not in ``used`` pass untouched; the order of the batch is kept.
    """
    left: dict[str, int] = {}
    for tenant_id, count in used.items():
        limit = limits[tenant_id].max_readings_per_s
        assert limit is not None
        left[tenant_id] = limit - count
    admitted: list[Delivery] = []
    for delivery in batch:
        owner = tenants.get(delivery.device_id) if delivery.device_id is not None else None
        if owner is None or owner not in left or not delivery.readings:
            admitted.append(delivery)
            continue
        readings = len(delivery.readings)
        if readings <= left[owner]:
            left[owner] -= readings
            admitted.append(delivery)
            continue
        admitted.append(refused(delivery, limits[owner], readings, max(0, left[owner])))
    return admitted


def refused(delivery: Delivery, tenant: TenantLimits, readings: int, left: int) -> Delivery:
    """``delivery`` with nothing to store and a ``tenant_quota`` reject (beside its own rejects)."""
    detail = (
        f"tenant {tenant.name!r} over its limit of {tenant.max_readings_per_s} readings/s: "
        f"message of {readings} reading{'s' if readings != 1 else ''}, {left} left in this second"
    )
    return Delivery(
        delivery.topic,
        delivery.device_id,
        delivery.received_at,
        delivery.payload,
        rejects=[*delivery.rejects, Reject("tenant_quota", detail)],
        outcome=delivery.outcome,
    )


def quota_client(redis_url: str) -> aioredis.Redis:
    """The Redis client of the quota: short timeouts, since a batch's commit waits for it."""
    return create_redis(redis_url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)


class TenantQuota:
    """Applies the tenants' readings limits to batches, counting in Redis (see the module)."""

    def __init__(
        self,
        redis_client: aioredis.Redis,
        names: RedisNames,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis_client
        self._names = names
        self._clock = clock
        self._monotonic = monotonic
        self._skip_until = 0.0
        self._failing = False

    async def apply(self, batch: list[Delivery], known: KnownDevices) -> list[Delivery]:
        """``batch`` with the messages over their tenant's limit refused (see :func:`admit`)."""
        if not any(t.max_readings_per_s is not None for t in known.limits.values()):
            return batch  # no tenant has a limit: not even a look at the batch
        wanted = demand(batch, known.tenants, known.limits)
        if not wanted:
            return batch
        if self._monotonic() < self._skip_until:
            metrics.TENANT_QUOTA_UNCHECKED.inc()
            return batch
        second = int(self._clock())
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for tenant_id, count in wanted.items():
                    key = self._names.tenant_rate_key(tenant_id, second)
                    pipe.incrby(key, count)
                    pipe.expire(key, WINDOW_TTL_S)
                replies = await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            metrics.TENANT_QUOTA_UNCHECKED.inc()
            self._skip_until = self._monotonic() + RETRY_AFTER_S
            if not self._failing:
                self._failing = True
                log.warning(
                    "tenant readings limits not enforced: Redis unavailable; storing unchecked",
                    error=f"{type(exc).__name__}: {exc}"[:500],
                )
            return batch
        if self._failing:
            self._failing = False
            log.info("tenant readings limits enforced again")
        totals = replies[0::2]
        used = {t: int(total) - n for (t, n), total in zip(wanted.items(), totals, strict=True)}
        return admit(batch, known.tenants, known.limits, used)
