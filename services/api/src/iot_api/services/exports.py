"""Telemetry export: ``GET /api/v1/telemetry/export``, one metric of one device as a streamed CSV or NDJSON.

Constant memory whatever the range: raw points are formatted by PostgreSQL (``COPY (SELECT ...) TO
STDOUT``) and each chunk is sent (gzip-compressed when asked) before more is read: a slow client slows
the copy down, never fills the API's memory.
Buckets (``bucket``, ``agg``) go through the history's aggregate query
(:meth:`~iot_api.repositories.telemetry.TelemetryRepository.aggregate`, which picks the rollup level),
page by page. Checks happen before the answer starts: a wrong parameter is a 4xx naming it, another
tenant's device a 404. One export at a time per credential in each process, and
``MAX_EXPORTS_PER_PROCESS`` in all (each holds a database connection while it streams).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec

from iot_api.errors import Invalid, RateLimited
from iot_api.services.telemetry import BUCKETS, TelemetryService, _point, aggregate_range, parse_agg
from iot_api.tenancy import TenantScope

FORMATS = ("csv", "ndjson")
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "ndjson": "application/x-ndjson"}
MAX_EXPORTS_PER_PROCESS = 4
BATCH_ROWS = 5000
BUCKETS_PER_QUERY = 5000
GZIP_LEVEL = 1
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class ExportQuery:
    device_id: str
    metric: str
    start: datetime | None
    end: datetime | None
    format: str
    bucket: str | None
    agg: str
    gzip: bool


def _iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


def _csv_field(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        if any(c in value for c in ',"\r\n'):
            return '"' + value.replace('"', '""') + '"'
        return value
    return repr(value)


class ExportService:
    def __init__(self, telemetry: TelemetryService, *, max_days: int = 366) -> None:
        self.telemetry = telemetry
        self.repo = telemetry.repo
        self.max_days = max_days
        self.active: set[str] = set()

    async def open(self, tenant: TenantScope, query: ExportQuery) -> tuple[AsyncIterator[bytes], str, str]:
        """Check the query; then the body's chunks, its media type and a file name."""
        if query.format not in FORMATS:
            reason = "csv or ndjson"
            if query.format == "parquet":
                reason += " (parquet is not offered: see docs/api.md, export)"
            raise Invalid("format", reason)
        if query.bucket is not None and query.bucket not in BUCKETS:
            raise Invalid("bucket", "one of " + " ".join(BUCKETS))
        start, end = aggregate_range(query.start, query.end)
        if end - start > timedelta(days=self.max_days):
            raise Invalid("from", f"the range is longer than {self.max_days} days (IOT_API_EXPORT_MAX_DAYS)")
        await self.telemetry.devices.require(tenant, query.device_id)
        principal = tenant.principal.subject
        if principal in self.active:
            raise RateLimited("an export of this credential is running; one at a time", retry_after_s=5)
        if len(self.active) >= MAX_EXPORTS_PER_PROCESS:
            raise RateLimited("too many exports are running; retry shortly", retry_after_s=5)
        self.active.add(principal)
        try:
            if query.bucket is None:
                chunks = self._raw(query, start, end)
            else:
                chunks = self._buckets(query, start, end, BUCKETS[query.bucket])
            if query.gzip:
                chunks = _gzip(chunks)
        except BaseException:
            self.active.discard(principal)
            raise
        name = f"{query.device_id}-{query.metric}.{query.format}" + (".gz" if query.gzip else "")
        return self._release(chunks, principal), MEDIA_TYPES[query.format], name

    async def _release(self, chunks: AsyncIterator[bytes], principal: str) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self.active.discard(principal)

    async def _raw(self, query: ExportQuery, start: datetime, end: datetime) -> AsyncIterator[bytes]:
        if query.format == "csv":
            yield b"ts,device_id,metric,value\n"
        async for chunk in self.repo.copy_raw(query.device_id, query.metric, start, end, query.format):
            yield chunk

    async def _buckets(
        self, query: ExportQuery, start: datetime, end: datetime, step: timedelta
    ) -> AsyncIterator[bytes]:
        aggs = parse_agg(query.agg)
        device, metric = query.device_id, query.metric
        if query.format == "csv":
            yield ("ts,device_id,metric," + ",".join(aggs) + "\n").encode()
        first = start
        while first < end:
            buckets = await self.repo.aggregate(device, metric, first, end, step, limit=BUCKETS_PER_QUERY)
            if not buckets:
                break
            points = [(b.ts, _point(b, aggs)) for b in buckets]
            if query.format == "csv":
                prefix = f",{_csv_field(device)},{_csv_field(metric)},"
                yield "".join(
                    _iso(ts) + prefix + ",".join(_csv_field(v[a]) for a in aggs) + "\n" for ts, v in points
                ).encode()
            else:
                yield _encoder.encode_lines(
                    [{"ts": ts, "device_id": device, "metric": metric, **v} for ts, v in points]
                )
            if len(buckets) < BUCKETS_PER_QUERY:
                break
            first = buckets[-1].ts + step


async def _gzip(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks as one gzip stream, compressed as they come."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    async for chunk in chunks:
        out = compressor.compress(chunk)
        if out:
            yield out
    yield compressor.flush()
