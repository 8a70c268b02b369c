"""Telemetry reads: raw pages, bucketed aggregates, multi-device history and latest values."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from iot_api.schemas.common import Page

Aggregate = Literal["avg", "min", "max", "sum", "count"]


class TelemetryPoint(msgspec.Struct, frozen=True):
    ts: datetime
    metric: str
    value: float | str


class TelemetryPage(Page, frozen=True, tag="raw", tag_field="kind"):
    """Raw points, newest first (``order=desc``) or oldest first (``order=asc``)."""

    device_id: str
    order: Literal["asc", "desc"]
    items: list[TelemetryPoint]


class AggregatePoint(msgspec.Struct, frozen=True, omit_defaults=True):
    """One bucket, labelled by its start; only the aggregates asked for are present."""

    ts: datetime
    avg: float | None = None
    min: float | None = None
    max: float | None = None
    sum: float | None = None
    count: int | None = None


class TelemetryAggregate(msgspec.Struct, frozen=True, tag="aggregate", tag_field="kind"):
    """Numeric values of one metric per time bucket (buckets without values are left out)."""

    device_id: str
    metric: str
    bucket: str
    agg: list[Aggregate]
    from_: datetime = msgspec.field(name="from")
    to: datetime
    points: list[AggregatePoint]


class SeriesPoint(msgspec.Struct, frozen=True, omit_defaults=True):
    """A raw point (``value``) or a bucket (the aggregates asked for)."""

    ts: datetime
    value: float | str | None = None
    avg: float | None = None
    min: float | None = None
    max: float | None = None
    sum: float | None = None
    count: int | None = None


class Series(msgspec.Struct, frozen=True):
    """``has_more``: the device has more points than shown; on a ``truncated`` page the last series goes
    on in the next page, otherwise the range holds more than ``limit`` raw points (narrow it)."""

    device_id: str
    metric: str
    has_more: bool
    points: list[SeriesPoint]


class History(msgspec.Struct, frozen=True):
    """One series per requested device, all on the same time range and bucket.

    At most IOT_API_MAX_POINTS_PER_RESPONSE points in all: past that the page is ``truncated`` and
    ``next_cursor`` continues right after the last point (the next page starts with that device's series).
    """

    metric: str
    bucket: str | None
    from_: datetime = msgspec.field(name="from")
    to: datetime
    series: list[Series]
    truncated: bool = False
    next_cursor: str | None = None


class LatestValue(msgspec.Struct, frozen=True):
    value: float | str
    ts: datetime


class DeviceLatest(msgspec.Struct, frozen=True):
    """Latest value of every metric of a device; ``source`` says whether Redis or PostgreSQL answered."""

    device_id: str
    metrics: dict[str, LatestValue]
    source: Literal["cache", "database"]


class LatestList(msgspec.Struct, frozen=True):
    items: list[DeviceLatest]
