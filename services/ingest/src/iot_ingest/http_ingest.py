"""HTTP device ingest: ``POST /ingest/v1/devices/{device_id}/telemetry`` on the ingest service's HTTP port.

For devices that cannot hold an MQTT connection. A request goes through the same pipeline as an MQTT
message: its body is parsed by :func:`~iot_ingest.payload.parse_telemetry` (the MQTT payload forms), becomes
one :class:`~iot_ingest.plan.Delivery` submitted to the same batcher, and the answer waits for that batch's
commit (and its Redis step), like a PUBACK. So the readings get the same after-commit treatment (latest
values, events, alert rules) and the same dead letters, and an answer of 200 means stored.

Bounded work per request: the body's size as sent and once decompressed (gzip bombs stop at the limit),
the readings per request, the time of the whole request (``IOT_INGEST_HTTP_TIMEOUT_S``: reading the body,
then waiting for the commit, after which the answer is 503), and the requests handled at once. A device
is limited by the per-device quota it shares with MQTT, and its tenant by its readings limit.

While PostgreSQL is unreachable the answer is 503 with ``Retry-After``, never a 2xx. A request answered
503 after its deadline stays queued and may still be committed later; posting it again is harmless, since a
reading is keyed by (device, metric, ts): a duplicate is a no-op (send ``ts`` with each reading for that:
a reading without one is stamped with the time of receipt, which differs on each attempt).

Each kind of request (telemetry, a device's reported state) is a :data:`Convert` function and a route
in :meth:`HttpIngest.routes`: authentication, limits, the commit and the answer are shared.
"""

from __future__ import annotations

import asyncio
import math
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
import structlog
from aiohttp import web

from iot_common.topics import is_valid_device_id
from iot_ingest import metrics
from iot_ingest.batcher import Batcher, BatcherClosed
from iot_ingest.consumer import DeviceQuota, state_report
from iot_ingest.device_auth import BadAuthorization, DeviceAuth, parse_authorization
from iot_ingest.payload import Limits, Reject, parse_telemetry
from iot_ingest.plan import Delivery, Outcome

log = structlog.stdlib.get_logger(__name__)

PREFIX: Final = "/ingest/v1/devices/{device_id}"
PROBLEM_TYPE: Final = "https://iot-platform.dev/problems/{status}"
PROBLEM_MEDIA_TYPE: Final = "application/problem+json"
CHALLENGE: Final = 'Basic realm="iot-ingest", charset="UTF-8", Bearer realm="iot-ingest"'
RETRY_AFTER_UNAVAILABLE_S: Final = 5
RETRY_AFTER_BUSY_S: Final = 1
READ_CHUNK: Final = 64 * 1024
_encoder: Final = msgspec.json.Encoder()


class Refused(Exception):
    """Answer the request with a problem (RFC 9457) instead of going on."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def response(self, instance: str) -> web.Response:
        body = {
            "type": PROBLEM_TYPE.format(status=self.status),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
            **self.extra,
        }
        return web.Response(
            body=_encoder.encode(body),
            status=self.status,
            content_type=PROBLEM_MEDIA_TYPE,
            headers=self.headers,
        )


class Rejected(msgspec.Struct, frozen=True):
    """One refused reading of a request (or the whole body when ``index`` is None)."""

    index: int | None
    reason: str
    detail: str


class Stored(msgspec.Struct, frozen=True):
    """The answer 200: readings stored (a duplicate of a stored reading counts), and those refused."""

    stored: int
    rejected: list[Rejected]


@dataclass(slots=True)
class Converted:
    """What a request's body became: the delivery to commit and the refused items of the body."""

    delivery: Delivery
    rejected: list[Rejected] = field(default_factory=list)


Convert = Callable[[str, str, bytes, datetime], Converted]
"""(device id, request path, body, time of receipt) to a delivery; raises :class:`Refused`."""


def unavailable(detail: str) -> Refused:
    headers = {"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)}
    return Refused(503, "Service Unavailable", detail, headers=headers)


def rejected_items(rejects: list[Reject], indices: list[int | None]) -> list[Rejected]:
    """The parse rejects as answer items; the ``[i] `` prefix of a batch element's detail is dropped."""
    items = []
    for position, reject in enumerate(rejects):
        index = indices[position] if position < len(indices) else None
        detail = reject.detail
        prefix = f"[{index}] "
        if index is not None and detail.startswith(prefix):
            detail = detail[len(prefix) :]
        items.append(Rejected(index, reject.reason, detail))
    return items


def decode_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent (``identity``) or gunzipped, at most ``limit`` bytes; raises :class:`Refused`."""
    if encoding in ("", "identity"):
        return raw
    if encoding != "gzip":
        raise Refused(415, "Unsupported Media Type", f"Content-Encoding {encoding[:40]!r}: use gzip or none")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        body = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise Refused(400, "Bad Request", f"body is not valid gzip: {exc}") from None
    if len(body) > limit:
        raise Refused(413, "Content Too Large", f"body larger than {limit} bytes once decompressed")
    if not inflater.eof:
        raise Refused(400, "Bad Request", "body is not valid gzip: truncated")
    if inflater.unused_data:
        raise Refused(400, "Bad Request", "body is not valid gzip: data after the end (one member only)")
    return body


class HttpIngest:
    """The routes of HTTP device ingest, feeding ``batcher`` (see the module)."""

    def __init__(
        self,
        *,
        auth: DeviceAuth,
        batcher: Batcher[Delivery],
        limits: Limits,
        quota: DeviceQuota | None,
        storage_failing: Callable[[], bool],
        accepting: Callable[[], bool],
        timeout_s: float,
        max_concurrent: int,
        max_body_bytes: int,
        max_readings: int,
    ) -> None:
        self._auth = auth
        self._batcher = batcher
        self._quota = quota
        self._storage_failing = storage_failing
        self._accepting = accepting
        self.timeout_s = timeout_s
        self.max_concurrent = max_concurrent
        self.max_body_bytes = max_body_bytes
        if quota is not None:
            # A request of more readings than the bucket holds could never pass the quota.
            max_readings = min(max_readings, int(quota.burst))
        self.max_readings = max_readings
        self._limits = msgspec.structs.replace(
            limits, max_payload_bytes=max_body_bytes, max_readings=max_readings
        )
        self._active = 0

    @property
    def active(self) -> int:
        """Requests being handled (from before their authentication to their answer)."""
        return self._active

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post(f"{PREFIX}/telemetry", self._route("telemetry", self.telemetry)),
            web.post(f"{PREFIX}/state/reported", self._route("state_reported", self.reported_state)),
        ]

    @staticmethod
    @web.middleware
    async def problems(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """aiohttp's own refusals under ``/ingest/`` (no such route, wrong method) as problem details."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if not request.path.startswith("/ingest/") or exc.status < 400:
                raise
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return Refused(exc.status, exc.reason, exc.text or exc.reason, headers=headers).response(
                request.path
            )

    def telemetry(self, device_id: str, path: str, body: bytes, received_at: datetime) -> Converted:
        """A telemetry body: one reading, flat, or an array (backfill) of them."""
        bucket = None if self._quota is None else self._quota.bucket(device_id)
        if bucket is not None and bucket.tokens < 1:
            raise self._over_quota(1)
        parsed = parse_telemetry(device_id, body, received_at, self._limits)
        count = len(parsed.readings)
        if bucket is not None and count and not bucket.take(count):
            raise self._over_quota(count)
        delivery = Delivery(
            path, device_id, received_at, body, parsed.readings, parsed.rejects, outcome=Outcome()
        )
        return Converted(delivery, rejected_items(parsed.rejects, parsed.indices))

    def reported_state(self, device_id: str, path: str, body: bytes, received_at: datetime) -> Converted:
        """A state report, as on ``devices/state/{id}/reported``: ``{"reported": {...}, "version": N}``
        (a JSON merge patch of the device's reported state; docs/device-state.md). It counts as one
        reading against the per-device quota."""
        if self._quota is not None and not self._quota.take(device_id, 1):
            raise self._over_quota(1)
        delivery = state_report(path, device_id, received_at, body, Outcome())
        return Converted(delivery, [Rejected(None, r.reason, r.detail) for r in delivery.rejects])

    def _over_quota(self, readings: int) -> Refused:
        assert self._quota is not None
        wait = max(1, math.ceil(readings / self._quota.rate))
        detail = (
            self._quota.detail if readings <= 1 else f"{self._quota.detail}; request of {readings} readings"
        )
        return Refused(
            429, "Too Many Requests", detail, headers={"Retry-After": str(wait)}, reason="rate_limited"
        )

    def _route(self, name: str, convert: Convert) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            try:
                response = await self._handle(request, convert)
            except Refused as refused:
                response = refused.response(request.path)
            metrics.HTTP_REQUESTS.labels(name, str(response.status)).inc()
            return response

        return handle

    async def _handle(self, request: web.Request, convert: Convert) -> web.Response:
        deadline = time.monotonic() + self.timeout_s
        device_id = request.match_info["device_id"]
        if not is_valid_device_id(device_id):
            raise Refused(
                404, "Not Found", "no such device: device ids match [A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
            )
        # Counted before authentication: a flood of bad credentials (each a look-up) is bounded too.
        if self._active >= self.max_concurrent:
            raise Refused(
                503,
                "Service Unavailable",
                f"{self.max_concurrent} requests already being handled",
                headers={"Retry-After": str(RETRY_AFTER_BUSY_S)},
            )
        self._active += 1
        metrics.HTTP_ACTIVE.inc()
        try:
            await self._authenticate(request, device_id)
            if not self._accepting():
                raise unavailable("the service is stopping")
            if self._storage_failing():
                raise unavailable("storage unavailable (PostgreSQL): nothing stored")
            return await self._store(request, device_id, convert, deadline)
        finally:
            self._active -= 1
            metrics.HTTP_ACTIVE.dec()

    async def _authenticate(self, request: web.Request, device_id: str) -> None:
        try:
            presented = parse_authorization(request.headers.get("Authorization"))
        except BadAuthorization as exc:
            raise self._unauthenticated(str(exc)) from None
        claimed = presented.device_id or device_id
        if not is_valid_device_id(claimed):
            raise self._unauthenticated("the Basic user name is not a device id")
        try:
            ok = await self._auth.verify(claimed, presented.secret)
        except Exception as exc:
            log.warning("device credential look-up failed", error=f"{type(exc).__name__}: {exc}"[:300])
            raise unavailable("cannot check the device credential now (PostgreSQL)") from None
        if not ok:
            raise self._unauthenticated("wrong, revoked or unknown device credential")
        if claimed != device_id:
            raise Refused(
                403, "Forbidden", f"device {claimed!r} may only post for itself, not for {device_id!r}"
            )

    @staticmethod
    def _unauthenticated(detail: str) -> Refused:
        return Refused(401, "Unauthorized", detail, headers={"WWW-Authenticate": CHALLENGE})

    async def _read(self, request: web.Request) -> bytes:
        limit = self.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise Refused(413, "Content Too Large", f"body of {request.content_length} bytes, limit {limit}")
        raw = bytearray()
        async for chunk in request.content.iter_chunked(READ_CHUNK):
            raw += chunk
            if len(raw) > limit:
                raise Refused(413, "Content Too Large", f"body larger than {limit} bytes")
        return bytes(raw)

    async def _store(
        self, request: web.Request, device_id: str, convert: Convert, deadline: float
    ) -> web.Response:
        if request.content_type != "application/json":
            raise Refused(
                415, "Unsupported Media Type", f"Content-Type {request.content_type!r}: use application/json"
            )
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                raw = await self._read(request)
        except TimeoutError:
            raise Refused(408, "Request Timeout", f"body not received within {self.timeout_s:g} s") from None
        body = decode_body(raw, encoding, self.max_body_bytes)
        received_at = datetime.now(UTC)
        try:
            converted = convert(device_id, request.path, body, received_at)
        except Refused:
            raise
        except Exception as exc:
            # As for MQTT (consumer.translate): a body that makes the parser fail is a dead letter, never
            # a 5xx nor a lost request.
            metrics.HANDLER_ERRORS.labels("translate").inc()
            detail = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("HTTP ingest body failed to parse, dead-lettered", device_id=device_id, error=detail)
            reject = Reject("handler_error", detail)
            delivery = Delivery(
                request.path, device_id, received_at, body, rejects=[reject], outcome=Outcome()
            )
            converted = Converted(delivery, [Rejected(None, reject.reason, detail)])
        delivery, rejected = converted.delivery, converted.rejected
        outcome = delivery.outcome
        assert outcome is not None
        try:
            future = self._batcher.submit_nowait(delivery)
        except BatcherClosed:
            raise unavailable("the service is stopping") from None
        try:
            await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            if not delivery.needs_device:
                # Only dead letters to write: the body is invalid whatever becomes of them.
                raise self._invalid(rejected) from None
            raise unavailable(
                f"not committed within {self.timeout_s:g} s (PostgreSQL unavailable or slow); "
                "nothing acknowledged: post again (readings with a ts are stored once)"
            ) from None
        except BatcherClosed:
            raise unavailable("the service is stopping") from None
        if not delivery.needs_device:
            raise self._invalid(rejected)
        refusal = outcome.refusal
        if refusal is not None:
            raise self._refused_whole(refusal, rejected)
        return web.Response(
            body=_encoder.encode(Stored(outcome.stored, rejected)), content_type="application/json"
        )

    @staticmethod
    def _invalid(rejected: list[Rejected]) -> Refused:
        first = rejected[0] if rejected else Rejected(None, "empty_reading", "nothing to store")
        where = "body" if first.index is None else f"reading [{first.index}]"
        return Refused(
            422,
            "Unprocessable Content",
            f"nothing stored: {where}: {first.reason}: {first.detail}"[:500],
            rejected=rejected,
        )

    @staticmethod
    def _refused_whole(refusal: Reject, rejected: list[Rejected]) -> Refused:
        if refusal.reason == "tenant_quota":
            return Refused(
                429,
                "Too Many Requests",
                refusal.detail,
                headers={"Retry-After": "1"},
                reason=refusal.reason,
                rejected=rejected,
            )
        if refusal.reason == "unknown_device":
            return Refused(404, "Not Found", refusal.detail, reason=refusal.reason)
        return Refused(422, "Unprocessable Content", refusal.detail, reason=refusal.reason, rejected=rejected)


def _loop_time(deadline: float) -> float:
    """``deadline`` (time.monotonic) on the event loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())
