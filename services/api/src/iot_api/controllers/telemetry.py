"""Telemetry history, latest values and the ingest dead letters."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, get
from litestar.di import NamedDependency
from litestar.params import PathParameter, QueryParameter

from iot_api.controllers.deps import REJECTS, TELEMETRY
from iot_api.pagination import decode_cursor, encode_cursor
from iot_api.problems import invalid, problem_responses
from iot_api.repositories.rejects import RejectRepository
from iot_api.schemas import (
    DeviceLatest,
    History,
    LatestList,
    RejectPage,
    TelemetryAggregate,
    TelemetryPage,
)
from iot_api.security import principal_of
from iot_api.services.telemetry import AGG_PATTERN, BUCKET_PATTERN, TelemetryService, utc
from iot_common.messages import METRIC_NAME_PATTERN
from iot_common.topics import DEVICE_ID_PATTERN

From = Annotated[
    datetime | None,
    QueryParameter(name="from", description="Start of the range (inclusive), RFC 3339; UTC when no zone"),
]
To = Annotated[datetime | None, QueryParameter(description="End of the range (exclusive), RFC 3339")]
Bucket = Annotated[
    str | None,
    QueryParameter(pattern=BUCKET_PATTERN, description="Bucket width: 1m 5m 10m 15m 30m 1h 2h 6h 12h 1d 7d"),
]
Agg = Annotated[
    str,
    QueryParameter(pattern=AGG_PATTERN, description="Comma-separated aggregates: avg,min,max,sum,count"),
]
Cursor = Annotated[
    str | None, QueryParameter(max_length=512, description="`next_cursor` of the previous page")
]
DeviceIds = Annotated[
    list[Annotated[str, msgspec.Meta(pattern=DEVICE_ID_PATTERN)]],
    QueryParameter(
        name="device_id", min_items=1, max_items=100, description="Repeat for each device (1-100)"
    ),
]
Metrics = Annotated[
    list[Annotated[str, msgspec.Meta(pattern=METRIC_NAME_PATTERN)]] | None,
    QueryParameter(
        max_items=50, description="Metric name; repeat for several (raw points), exactly one with `bucket`"
    ),
]


class TelemetryController(Controller):
    path = "/api/v1"
    tags = ["telemetry"]
    opt = {"scope": "read"}
    dependencies = {"telemetry": TELEMETRY}

    @get(
        "/devices/{device_id:str}/telemetry",
        operation_id="getDeviceTelemetry",
        responses=problem_responses(404),
    )
    async def device_telemetry(
        self,
        request: Request[Any, Any, Any],
        telemetry: NamedDependency[TelemetryService],
        device_id: Annotated[str, PathParameter()],
        from_: From = None,
        to: To = None,
        metric: Metrics = None,
        order: Annotated[
            Literal["asc", "desc"], QueryParameter(description="Raw points: time order")
        ] = "desc",
        limit: Annotated[int, QueryParameter(ge=1, le=10_000, description="Raw points per page")] = 1000,
        cursor: Cursor = None,
        bucket: Bucket = None,
        agg: Agg = "avg",
    ) -> TelemetryPage | TelemetryAggregate:
        """Raw points (cursor-paginated), or with ``bucket`` one point per bucket with the ``agg`` fields."""
        if bucket is not None and (not metric or len(set(metric)) != 1):
            raise invalid("metric", "exactly one metric is needed with `bucket`")
        async with telemetry.heavy.hold(principal_of(request).subject):
            if bucket is None or not metric:
                return await telemetry.raw(device_id, metric, from_, to, order, limit, cursor)
            return await telemetry.aggregate(device_id, metric[0], from_, to, bucket, agg)

    @get(
        "/devices/{device_id:str}/latest",
        operation_id="getDeviceLatest",
        responses=problem_responses(404),
    )
    async def device_latest(
        self, telemetry: NamedDependency[TelemetryService], device_id: Annotated[str, PathParameter()]
    ) -> DeviceLatest:
        """Latest value of every metric: from the Redis hash the ingest service keeps, else PostgreSQL."""
        return await telemetry.latest(device_id)

    @get("/telemetry/latest", operation_id="getLatestMany", responses=problem_responses())
    async def latest_many(
        self, telemetry: NamedDependency[TelemetryService], device_id: DeviceIds
    ) -> LatestList:
        """Latest values of several devices in one call (a device without data has no metrics)."""
        return LatestList(items=await telemetry.latest_many(device_id))

    @get("/telemetry/history", operation_id="getHistory", responses=problem_responses())
    async def history(
        self,
        request: Request[Any, Any, Any],
        telemetry: NamedDependency[TelemetryService],
        device_id: DeviceIds,
        metric: Annotated[str, QueryParameter(pattern=METRIC_NAME_PATTERN, description="The metric to draw")],
        from_: From = None,
        to: To = None,
        bucket: Bucket = None,
        agg: Agg = "avg",
        limit: Annotated[int, QueryParameter(ge=1, le=10_000, description="Raw points per device")] = 1000,
        cursor: Cursor = None,
    ) -> History:
        """One metric of many devices on one time range (default: the last 24 hours), raw or bucketed.

        At most ``IOT_API_MAX_POINTS_PER_RESPONSE`` points per response: past that the page says
        ``truncated`` and ``next_cursor`` continues exactly after its last point (same query, plus the
        cursor; the range is the first page's). At most ``IOT_API_MAX_HEAVY_READS_PER_PRINCIPAL`` telemetry
        reads of one credential run at once; more get 429 with ``Retry-After``.
        """
        async with telemetry.heavy.hold(principal_of(request).subject):
            return await telemetry.history(device_id, metric, from_, to, bucket, agg, limit, cursor)


class RejectController(Controller):
    path = "/api/v1/ingest/rejects"
    tags = ["ingest"]
    opt = {"scope": "read"}
    dependencies = {"rejects": REJECTS}

    @get("/", operation_id="listIngestRejects", responses=problem_responses())
    async def list_rejects(
        self,
        rejects: NamedDependency[RejectRepository],
        device_id: Annotated[str | None, QueryParameter(max_length=200, pattern=r"^[^\x00]*$")] = None,
        reason: Annotated[str | None, QueryParameter(max_length=200, pattern=r"^[^\x00]*$")] = None,
        from_: From = None,
        to: To = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
        cursor: Cursor = None,
    ) -> RejectPage:
        """Messages the ingest service refused, newest first, filtered by device and reason."""
        after = None
        if cursor:
            received_at, reject_id = decode_cursor(cursor, (datetime, int))
            after = (received_at, reject_id)
        rows = await rejects.list(
            device_id=device_id,
            reason=reason,
            start=utc(from_),
            end=utc(to),
            after=after,
            limit=limit + 1,
        )
        has_more = len(rows) > limit
        items = rows[:limit]
        return RejectPage(
            items=items,
            has_more=has_more,
            next_cursor=encode_cursor(items[-1].received_at, items[-1].id) if has_more else None,
        )
