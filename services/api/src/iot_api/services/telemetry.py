"""Telemetry queries: raw pages, bucketed aggregates, latest values (Redis first), multi-device history.

Telemetry rows carry no tenant: each read first checks that its devices are the caller's tenant's
(:class:`~iot_api.services.devices.DeviceService`, cached per tenant). Another tenant's device reads like
an unknown one: 404 for one device, no data in a multi-device read.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec

from iot_api.cache import Cache
from iot_api.errors import Invalid, RateLimited
from iot_api.pagination import decode_cursor, encode_cursor, paginate
from iot_api.queries import MAX_TS, MIN_TS, PageRequest, utc
from iot_api.repositories.telemetry import Bucket, TelemetryRepository
from iot_api.schemas.telemetry import (
    Aggregate,
    AggregatePoint,
    DeviceLatest,
    History,
    LatestList,
    LatestValue,
    Series,
    SeriesPoint,
    TelemetryAggregate,
    TelemetryPage,
    TelemetryPoint,
)
from iot_api.services.devices import DeviceService
from iot_api.tenancy import TenantScope
from iot_common import messages
from iot_common.topics import RedisNames

BUCKETS: dict[str, timedelta] = {
    "1m": timedelta(minutes=1),
    "5m": timedelta(minutes=5),
    "10m": timedelta(minutes=10),
    "15m": timedelta(minutes=15),
    "30m": timedelta(minutes=30),
    "1h": timedelta(hours=1),
    "2h": timedelta(hours=2),
    "6h": timedelta(hours=6),
    "12h": timedelta(hours=12),
    "1d": timedelta(days=1),
    "7d": timedelta(days=7),
}
BUCKET_PATTERN = "^(" + "|".join(BUCKETS) + ")" + r"(?!\n)$"
AGGREGATES: tuple[Aggregate, ...] = ("avg", "min", "max", "sum", "count")
AGG_PATTERN = r"^(avg|min|max|sum|count)(,(avg|min|max|sum|count))*(?!\n)$"
MAX_BUCKETS = 10_000
DEFAULT_AGGREGATE_RANGE = timedelta(hours=24)

_latest_decoder = msgspec.json.Decoder(messages.LatestValue)


def parse_agg(agg: str) -> list[Aggregate]:
    wanted = set(agg.split(","))
    return [a for a in AGGREGATES if a in wanted]


def aggregate_range(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    end = utc(end) or datetime.now(UTC)
    start = utc(start) or max(end - DEFAULT_AGGREGATE_RANGE, MIN_TS)
    if start >= end:
        raise Invalid("from", "must be before `to`")
    return start, end


def _point(bucket: Bucket, aggs: list[Aggregate]) -> dict[str, float | int | None]:
    values: dict[str, float | int | None] = {
        "avg": bucket.sum / bucket.count if bucket.count else None,
        "min": bucket.min,
        "max": bucket.max,
        "sum": bucket.sum,
        "count": bucket.count,
    }
    return {a: values[a] for a in aggs}


def decode_latest(raw: dict[bytes, bytes]) -> dict[str, LatestValue]:
    """The Redis latest-values hash as metrics; entries that do not decode are skipped."""
    result: dict[str, LatestValue] = {}
    for field, value in raw.items():
        try:
            latest = _latest_decoder.decode(value)
        except msgspec.DecodeError:
            continue
        result[field.decode(errors="replace")] = LatestValue(value=latest.value, ts=latest.ts)
    return dict(sorted(result.items()))


class HeavyReads:
    """At most ``per_principal`` heavy reads (raw pages, aggregates, history) of one principal at once.

    Past it the request is refused at once with 429 and ``Retry-After`` rather than queued: a queue would
    hold the request (and its connection) anyway, and a client that fans out is told to slow down. The
    count is per process (each replica has its own), which is what bounds each process's memory.
    """

    RETRY_AFTER_S = 1

    def __init__(self, per_principal: int) -> None:
        self.per_principal = per_principal
        self.active: Counter[str] = Counter()

    @asynccontextmanager
    async def hold(self, principal: str) -> AsyncIterator[None]:
        if self.active[principal] >= self.per_principal:
            raise RateLimited(
                f"at most {self.per_principal} telemetry reads at once per credential; retry shortly",
                retry_after_s=self.RETRY_AFTER_S,
            )
        self.active[principal] += 1
        try:
            yield
        finally:
            self.active[principal] -= 1
            if self.active[principal] <= 0:
                del self.active[principal]


def _fingerprint(*parts: object) -> str:
    """Ties a history cursor to the query it continues (devices, metric, bucket, limit)."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class DeviceQuery:
    """A read of one device's telemetry: raw points of ``metrics`` (all without), a page of ``limit`` in
    ``order``; or with ``bucket``, the ``agg`` aggregates of exactly one metric per bucket."""

    device_id: str
    metrics: list[str] | None
    start: datetime | None
    end: datetime | None
    order: Literal["asc", "desc"]
    limit: int
    cursor: str | None
    bucket: str | None
    agg: str


class TelemetryService:
    def __init__(
        self,
        repo: TelemetryRepository,
        devices: DeviceService,
        cache: Cache,
        names: RedisNames,
        *,
        max_points: int = 20_000,
        heavy_reads_per_principal: int = 2,
    ) -> None:
        self.names = names
        self.repo = repo
        self.devices = devices
        self.cache = cache
        self.max_points = max_points
        self.heavy = HeavyReads(heavy_reads_per_principal)

    async def device_telemetry(
        self, tenant: TenantScope, query: DeviceQuery
    ) -> TelemetryPage | TelemetryAggregate:
        """Raw points of a device (a page), or with ``bucket`` the buckets of exactly one metric; one of
        the principal's heavy reads."""
        metrics = query.metrics
        if query.bucket is not None and (not metrics or len(set(metrics)) != 1):
            raise Invalid("metric", "exactly one metric is needed with `bucket`")
        async with self.heavy.hold(tenant.principal.subject):
            if query.bucket is None or not metrics:
                return await self.raw(tenant, query)
            return await self.aggregate(tenant, query, metrics[0], query.bucket)

    async def raw(self, tenant: TenantScope, query: DeviceQuery) -> TelemetryPage:
        device_id = query.device_id
        await self.devices.require(tenant, device_id)
        start, end, descending = utc(query.start), utc(query.end), query.order == "desc"

        async def fetch(after: tuple[Any, ...] | None, n: int) -> list[TelemetryPoint]:
            names = sorted(set(query.metrics)) if query.metrics else await self.repo.metrics(device_id)
            if not names:
                return []
            rows = await self.repo.raw(
                device_id, names, start, end, descending=descending, after=after, limit=n
            )
            return [TelemetryPoint(ts=r.ts, metric=r.metric, value=r.value) for r in rows]

        return await paginate(
            TelemetryPage,
            PageRequest(min(query.limit, self.max_points), query.cursor),
            (datetime, str),
            fetch,
            lambda point: (point.ts, point.metric),
            device_id=device_id,
            order=query.order,
        )

    async def aggregate(
        self, tenant: TenantScope, query: DeviceQuery, metric: str, bucket: str
    ) -> TelemetryAggregate:
        await self.devices.require(tenant, query.device_id)
        start_, end_ = aggregate_range(query.start, query.end)
        step = self._check_buckets(start_, end_, bucket, min(MAX_BUCKETS, self.max_points))
        aggs = parse_agg(query.agg)
        buckets = await self.repo.aggregate(query.device_id, metric, start_, end_, step)
        return TelemetryAggregate(
            device_id=query.device_id,
            metric=metric,
            bucket=bucket,
            agg=aggs,
            from_=start_,
            to=end_,
            points=[AggregatePoint(ts=b.ts, **_point(b, aggs)) for b in buckets],  # type: ignore[arg-type]
        )

    @staticmethod
    def _check_buckets(start: datetime, end: datetime, bucket: str, most: int = MAX_BUCKETS) -> timedelta:
        step = BUCKETS[bucket]
        if (end - start) / step > most:
            raise Invalid("bucket", f"more than {most} buckets in the range; use a larger bucket")
        return step

    async def latest(self, tenant: TenantScope, device_id: str) -> DeviceLatest:
        await self.devices.require(tenant, device_id)
        key = self.names.latest_key(device_id)
        return (await self._latest([device_id], await self.cache.hgetall_many([key])))[0]

    async def latest_many(self, tenant: TenantScope, device_ids: list[str]) -> LatestList:
        """Latest values of each device asked for; an unknown device, or another tenant's, answers with no
        metrics. One Redis round trip for the devices' cache entries and their latest values together."""
        ids = list(dict.fromkeys(device_ids))
        keys = [self.devices.device_key(tenant, d) for d in ids]
        # GETs rather than one MGET: on a Redis Cluster the keys live on different shards.
        found = await self.cache.pipeline(
            lambda p: ([p.get(k) for k in keys], [p.hgetall(self.names.latest_key(d)) for d in ids])
        )
        entries: list[bytes | None] = found[: len(ids)] if found is not None else [None] * len(ids)
        owned = await self.devices.owned_of(tenant, ids, entries)
        mine = [d for d in ids if d in owned]
        hashes = found[len(ids) :] if found is not None else None
        cached = None if hashes is None else [h for d, h in zip(ids, hashes, strict=True) if d in owned]
        latest = {item.device_id: item for item in await self._latest(mine, cached)}
        return LatestList(items=[latest.get(d) or DeviceLatest(d, {}, "database") for d in ids])

    async def _latest(
        self, device_ids: list[str], cached: list[dict[bytes, bytes]] | None
    ) -> list[DeviceLatest]:
        """Latest values of devices already checked: from their Redis hashes (``cached``, None when Redis is
        down), else from the table."""
        result = []
        for index, device_id in enumerate(device_ids):
            if cached is not None and cached[index]:
                result.append(DeviceLatest(device_id, decode_latest(cached[index]), "cache"))
                continue
            rows = await self.repo.latest(device_id)
            metrics = {m: LatestValue(value=v, ts=ts) for m, (v, ts) in sorted(rows.items())}
            result.append(DeviceLatest(device_id, metrics, "database"))
        return result

    async def history(
        self,
        tenant: TenantScope,
        device_ids: list[str],
        metric: str,
        start: datetime | None,
        end: datetime | None,
        bucket: str | None,
        agg: str,
        limit: int,
        cursor: str | None = None,
    ) -> History:
        """One series of ``metric`` per device: raw points (oldest first, ``limit`` each) or buckets.

        A response holds at most ``max_points`` points in all. When the series do not fit, the page stops
        after ``max_points`` points (``truncated``) and ``next_cursor`` continues exactly after the last
        point returned: the same device, the next point, on the same time range as the first page. One of
        the principal's heavy reads. A device that is not the tenant's has an empty series, as an unknown one.
        """
        async with self.heavy.hold(tenant.principal.subject):
            ids = list(dict.fromkeys(device_ids))
            owned = await self.devices.owned_of(tenant, ids, [None] * len(ids))
            step = None
            fingerprint = _fingerprint(ids, metric, bucket, limit)
            index, emitted, after = 0, 0, None
            if cursor:
                mark, index, start_, end_, after, emitted = decode_cursor(
                    cursor, (str, int, datetime, datetime, datetime | None, int)
                )
                if mark != fingerprint or not 0 <= index < len(ids) or not 0 <= emitted < limit:
                    raise Invalid(
                        "cursor", "not a cursor of this query (same devices, metric, bucket, limit)"
                    )
                # The fingerprint is no secret: a client can write any range into a cursor. Only a range this
                # endpoint could have chosen (see aggregate_range) is taken, so arithmetic on it cannot fail.
                if not (MIN_TS <= start_ < end_ <= MAX_TS and (after is None or start_ <= after <= end_)):
                    raise Invalid("cursor", "not a cursor returned by this endpoint")
            else:
                start_, end_ = aggregate_range(start, end)
            if bucket is not None:
                step = self._check_buckets(start_, end_, bucket)
            aggs = parse_agg(agg)
            budget = self.max_points
            series: list[Series] = []
            next_cursor = None
            for i in range(index, len(ids)):
                device_id = ids[i]
                after_ts, done = (after, emitted) if i == index else (None, 0)
                if budget == 0:
                    next_cursor = encode_cursor(fingerprint, i, start_, end_, None, 0)
                    break
                if device_id not in owned:
                    series.append(Series(device_id=device_id, metric=metric, has_more=False, points=[]))
                    continue
                if step is not None:
                    first = start_ if after_ts is None else after_ts + step
                    buckets = await self.repo.aggregate(
                        device_id, metric, first, end_, step, limit=budget + 1
                    )
                    points = [SeriesPoint(ts=b.ts, **_point(b, aggs)) for b in buckets[:budget]]  # type: ignore[arg-type]
                    cut = len(buckets) > budget
                    series.append(Series(device_id=device_id, metric=metric, has_more=cut, points=points))
                    if cut:
                        next_cursor = encode_cursor(fingerprint, i, start_, end_, points[-1].ts, 0)
                        break
                else:
                    want = min(limit - done, budget)
                    position = (after_ts, metric) if after_ts is not None else None
                    rows = await self.repo.raw(
                        device_id, [metric], start_, end_, descending=False, after=position, limit=want + 1
                    )
                    points = [SeriesPoint(ts=r.ts, value=r.value) for r in rows[:want]]
                    more = len(rows) > want
                    series.append(Series(device_id=device_id, metric=metric, has_more=more, points=points))
                    if more and budget < limit - done:  # cut by the response's budget, not by `limit`
                        next_cursor = encode_cursor(
                            fingerprint, i, start_, end_, points[-1].ts, done + len(points)
                        )
                        break
                budget -= len(points)
            return History(
                metric=metric,
                bucket=bucket,
                from_=start_,
                to=end_,
                series=series,
                truncated=next_cursor is not None,
                next_cursor=next_cursor,
            )
