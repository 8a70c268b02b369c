"""Telemetry history and latest values."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, get
from litestar.params import QueryParameter
from litestar.response import Stream

from iot_api.controllers.params import Cursor, DeviceIdPath, From, To
from iot_api.problems import problem_responses
from iot_api.schemas.telemetry import DeviceLatest, History, LatestList, TelemetryAggregate, TelemetryPage
from iot_api.services.exports import ExportQuery
from iot_api.services.telemetry import AGG_PATTERN, BUCKET_PATTERN, DeviceQuery
from iot_api.state import AppServices
from iot_api.tenancy import Tenant
from iot_common.messages import METRIC_NAME_PATTERN
from iot_common.topics import DEVICE_ID_PATTERN

Bucket = Annotated[
    str | None,
    QueryParameter(pattern=BUCKET_PATTERN, description="Bucket width: 1m 5m 10m 15m 30m 1h 2h 6h 12h 1d 7d"),
]
Agg = Annotated[
    str,
    QueryParameter(pattern=AGG_PATTERN, description="Comma-separated aggregates: avg,min,max,sum,count"),
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
    opt = {"permission": "read"}

    @get(
        "/devices/{device_id:str}/telemetry",
        operation_id="getDeviceTelemetry",
        responses=problem_responses(404),
    )
    async def device_telemetry(
        self,
        services: AppServices,
        tenant: Tenant,
        device_id: DeviceIdPath,
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
        query = DeviceQuery(device_id, metric, from_, to, order, limit, cursor, bucket, agg)
        return await services.telemetry.device_telemetry(tenant, query)

    @get("/devices/{device_id:str}/latest", operation_id="getDeviceLatest", responses=problem_responses(404))
    async def device_latest(
        self, services: AppServices, tenant: Tenant, device_id: DeviceIdPath
    ) -> DeviceLatest:
        """Latest value of every metric: from the Redis hash the ingest service keeps, else PostgreSQL."""
        return await services.telemetry.latest(tenant, device_id)

    @get("/telemetry/latest", operation_id="getLatestMany", responses=problem_responses())
    async def latest_many(self, services: AppServices, tenant: Tenant, device_id: DeviceIds) -> LatestList:
        """Latest values of several devices in one call (a device without data, unknown or of another
        tenant has no metrics)."""
        return await services.telemetry.latest_many(tenant, device_id)

    @get(
        "/telemetry/export",
        operation_id="exportTelemetry",
        responses=problem_responses(404),
        response_description="The rows, streamed: CSV (header ts,device_id,metric,value) or NDJSON",
    )
    async def export(
        self,
        services: AppServices,
        tenant: Tenant,
        request: Request[Any, Any, Any],
        device_id: Annotated[str, QueryParameter(pattern=DEVICE_ID_PATTERN, description="The device")],
        metric: Annotated[str, QueryParameter(pattern=METRIC_NAME_PATTERN, description="The metric")],
        from_: From = None,
        to: To = None,
        format_: Annotated[
            str, QueryParameter(name="format", max_length=16, description="csv or ndjson")
        ] = "csv",
        bucket: Bucket = None,
        agg: Agg = "avg",
    ) -> Stream:
        """Every point of one metric of one device in the range (default: the last 24 hours, at most
        ``IOT_API_EXPORT_MAX_DAYS``), oldest first, streamed in constant memory; with ``bucket`` one row per
        bucket with the ``agg`` columns, as in the history. Compressed when the request accepts gzip. One
        export at a time per credential (else 429)."""
        accepts = request.headers.get("accept-encoding", "")
        gzip = any(part.split(";")[0].strip() == "gzip" for part in accepts.split(","))
        query = ExportQuery(device_id, metric, from_, to, format_, bucket, agg, gzip)
        chunks, media_type, name = await services.exports.open(tenant, query)
        headers = {"Content-Disposition": f'attachment; filename="{name}"', "Vary": "Accept-Encoding"}
        if gzip:
            headers["Content-Encoding"] = "gzip"
        return Stream(chunks, media_type=media_type, headers=headers)

    @get("/telemetry/history", operation_id="getHistory", responses=problem_responses())
    async def history(
        self,
        services: AppServices,
        tenant: Tenant,
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
        return await services.telemetry.history(
            tenant, device_id, metric, from_, to, bucket, agg, limit, cursor
        )
