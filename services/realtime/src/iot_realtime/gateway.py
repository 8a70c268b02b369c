"""The ``/ws`` endpoint: handshake (origin, credential), then client frames to hub calls.

The aiohttp handler only translates the transport; :class:`Gateway` holds the logic (authentication,
subscribe/unsubscribe with the latest-values snapshot, ping) and the set of open connections, which it
closes with 1001 "going away" when the process stops.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis
from aiohttp import WSMsgType, web
from redis.exceptions import RedisError

from iot_common.auth import (
    InvalidCredential,
    Principal,
    UnknownApiKey,
    api_key_prefix,
    decode_token,
    looks_like_api_key,
    verify_api_key,
)
from iot_common.logging import get_logger
from iot_common.messages import LatestValue, StateEvent
from iot_common.net import address_key
from iot_common.topics import RedisNames
from iot_realtime import metrics
from iot_realtime.backfill import Seam, stored_readings
from iot_realtime.connection import Connection, EventFilter, MetricFilter
from iot_realtime.devices import KnownDevices
from iot_realtime.hub import Hub
from iot_realtime.limits import ExpiringSet, RateLimiter, client_address
from iot_realtime.protocol import (
    CLOSE_FORBIDDEN,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_TOO_MANY_CONNECTIONS,
    CLOSE_TOO_MANY_FAILURES,
    CLOSE_UNAUTHORIZED,
    ERR_ALREADY_AUTHENTICATED,
    ERR_BINARY,
    ERR_RATE_LIMITED,
    ERR_TOO_MANY,
    ERR_UNAVAILABLE,
    ERR_UNKNOWN_DEVICE,
    WILDCARD,
    Ack,
    Auth,
    BackfillTelemetry,
    ClientFrame,
    Error,
    FrameError,
    Latest,
    LatestMetric,
    LatestState,
    Ping,
    Pong,
    Subscribe,
    Unsubscribe,
    decode_client_frame,
    encode,
)
from iot_realtime.settings import RealtimeSettings

log = get_logger(__name__)

MAX_WIRE_FRAME_BYTES = 1024 * 1024
"""Frames above this are refused by the WebSocket layer itself (close 1009); smaller ones above
``IOT_REALTIME_MAX_FRAME_BYTES`` get an ``error`` frame and the connection stays open."""

RETRY_AFTER_S = 5
"""``Retry-After`` of the HTTP 503 a full process answers (``IOT_REALTIME_MAX_CONNECTIONS``)."""

UNKNOWN_KEY_TTL_S = 10.0
"""How long an API-key prefix that matched no key is answered "unknown" without asking PostgreSQL. Prefixes
are 48 random bits, so a key created meanwhile is never one remembered; short all the same, as the
bootstrap key may be tried before the API has stored it."""

_latest_decoder = msgspec.json.Decoder(LatestValue)
_state_decoder = msgspec.json.Decoder(StateEvent)


def _state(raw: bytes | None) -> LatestState | None:
    """The state in the Redis copy (an encoded ``StateEvent``); None when there is none (or unreadable)."""
    if raw is None:
        return None
    try:
        event = _state_decoder.decode(raw)
    except msgspec.MsgspecError:
        return None
    return LatestState(event.desired, event.reported, event.delta, event.version)


class Refused(Exception):
    """The handshake failed: close with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Gateway:
    """Everything a connection needs: settings, the hub, Redis for snapshots, PostgreSQL for API keys."""

    def __init__(
        self,
        settings: RealtimeSettings,
        hub: Hub,
        redis: aioredis.Redis,
        pool: asyncpg.Pool[asyncpg.Record],
        names: RedisNames,
    ) -> None:
        self.settings = settings
        self.names = names
        self.hub = hub
        self.redis = redis
        self.pool = pool
        self.connections: set[Connection] = set()
        self.devices = KnownDevices(pool, settings.realtime_device_cache_s)
        self.device_checks = RateLimiter(settings.realtime_device_checks_per_minute)
        """Subscribe frames that query PostgreSQL, per credential."""
        self.auth_failures = RateLimiter(settings.realtime_auth_failures_per_minute)
        self.trusted_proxies = settings.trusted_networks()
        """Failed API-key authentications, per client address."""
        self.unknown_keys = ExpiringSet(UNKNOWN_KEY_TTL_S)
        """API-key prefixes that matched no key lately."""
        self.sockets = 0
        """Open WebSockets, authenticated or not (``IOT_REALTIME_MAX_CONNECTIONS``)."""
        self._connections_of: dict[str, int] = {}
        self._subscriptions_of: dict[str, int] = {}
        """Connections and subscriptions held by each credential (principal subject), over its connections."""
        self._allow_any_origin = "*" in settings.cors_origins
        self._origins = frozenset(settings.cors_origins)

    # -- handshake -----------------------------------------------------------------------------------

    def check_origin(self, origin: str | None) -> None:
        """Browsers always send ``Origin``; a client without one (a script, a device) is not a browser."""
        if origin is not None and not self._allow_any_origin and origin not in self._origins:
            raise Refused(CLOSE_FORBIDDEN, f"origin not allowed: {origin}")

    async def authenticate(self, credential: str, peer: str | None = None) -> Principal:
        """A JWT (``access`` or ``realtime``) or an API key, with at least the ``read`` scope."""
        try:
            if looks_like_api_key(credential):
                principal = await self._verify_api_key(credential, address_key(peer))
            else:
                principal = decode_token(self.settings.jwt_secret, credential, accept=("access", "realtime"))
        except InvalidCredential as exc:
            raise Refused(CLOSE_UNAUTHORIZED, str(exc)) from None
        except (OSError, asyncpg.PostgresError) as exc:
            log.error("could not verify an API key", error=str(exc))
            raise Refused(CLOSE_INTERNAL_ERROR, "could not verify the credential, try again") from None
        if not principal.allows("read"):
            raise Refused(CLOSE_FORBIDDEN, "credential lacks the read scope")
        return principal

    async def _verify_api_key(self, key: str, address: str) -> Principal:
        """Look the key up, unless its address failed too often lately or its prefix is known unknown."""
        if self.auth_failures.exhausted(address):
            raise Refused(
                CLOSE_TOO_MANY_FAILURES, "too many failed authentications from this address, try again later"
            )
        prefix = api_key_prefix(key)
        try:
            if prefix is not None and prefix in self.unknown_keys:
                raise InvalidCredential("unknown API key")
            if prefix is not None:
                metrics.API_KEY_LOOKUPS.inc()
            return await verify_api_key(self.pool, key)
        except InvalidCredential as exc:
            if isinstance(exc, UnknownApiKey) and prefix is not None:
                self.unknown_keys.add(prefix)
            self.auth_failures.take(address)
            raise

    async def tenant_for(self, principal: Principal, requested: str | None) -> str:
        """The tenant a connection acts in: the credential's own, or the one a platform admin names
        (``?tenant=`` or the ``auth`` frame's ``tenant``); naming another tenant takes a platform admin."""
        own = str(principal.tenant_id)
        if requested is None:
            return own
        try:
            wanted = str(uuid.UUID(requested))
        except ValueError:
            raise Refused(CLOSE_FORBIDDEN, "tenant must be a tenant id (a UUID)") from None
        if wanted == own:
            return own
        if not principal.platform_admin:
            raise Refused(CLOSE_FORBIDDEN, "only a platform admin may choose another tenant")
        try:
            exists = await self.pool.fetchval("SELECT true FROM tenants WHERE id = $1::uuid", wanted)
        except (OSError, asyncpg.PostgresError) as exc:
            log.error("could not check a tenant", error=str(exc))
            raise Refused(CLOSE_INTERNAL_ERROR, "could not check the tenant, try again") from None
        if not exists:
            raise Refused(CLOSE_FORBIDDEN, "no such tenant")
        return wanted

    def check_admission(self, principal: Principal) -> None:
        """Refuse a connection beyond ``IOT_REALTIME_MAX_CONNECTIONS_PER_PRINCIPAL`` for its credential."""
        limit = self.settings.realtime_max_connections_per_principal
        if self._connections_of.get(principal.subject, 0) >= limit:
            raise Refused(
                CLOSE_TOO_MANY_CONNECTIONS, f"too many connections for this credential (limit {limit})"
            )

    def register(self, conn: Connection) -> None:
        """Count an admitted connection (call right after :meth:`check_admission`, with no await between)."""
        self.connections.add(conn)
        subject = conn.principal.subject
        self._connections_of[subject] = self._connections_of.get(subject, 0) + 1
        metrics.CONNECTIONS.inc()

    async def await_auth_frame(self, ws: web.WebSocketResponse) -> Auth:
        """The first frame of a client that gave no ``?token=``: it must be ``auth``, and come in time."""
        try:
            message = await ws.receive(timeout=self.settings.realtime_auth_timeout_s)
        except TimeoutError:
            raise Refused(CLOSE_UNAUTHORIZED, "no credential: send ?token= or an auth frame") from None
        if message.type is not WSMsgType.TEXT:
            raise Refused(CLOSE_UNAUTHORIZED, "expected an auth frame")
        try:
            frame = decode_client_frame(message.data, self.settings.realtime_max_frame_bytes)
        except FrameError as exc:
            raise Refused(CLOSE_UNAUTHORIZED, f"expected an auth frame: {exc.message}") from None
        if not isinstance(frame, Auth):
            raise Refused(CLOSE_UNAUTHORIZED, "expected an auth frame first")
        return frame

    # -- frames --------------------------------------------------------------------------------------

    async def handle_text(self, conn: Connection, data: str) -> None:
        """Answer one client text frame; a bad one gets an ``error`` frame and changes nothing."""
        try:
            frame = decode_client_frame(data, self.settings.realtime_max_frame_bytes)
        except FrameError as exc:
            metrics.CLIENT_FRAMES.labels(exc.code).inc()
            conn.send_now(exc.frame())
            return
        metrics.CLIENT_FRAMES.labels("ok").inc()
        await self.handle_frame(conn, frame)

    def handle_binary(self, conn: Connection) -> None:
        metrics.CLIENT_FRAMES.labels(ERR_BINARY).inc()
        conn.send_now(encode(Error(code=ERR_BINARY, message="frames are JSON text frames")))

    async def handle_frame(self, conn: Connection, frame: ClientFrame) -> None:
        if isinstance(frame, Subscribe):
            await self.subscribe(conn, frame)
        elif isinstance(frame, Unsubscribe):
            await self.unsubscribe(conn, frame)
        elif isinstance(frame, Ping):
            conn.send_now(encode(Pong(id=frame.id)))
        else:
            conn.send_now(
                encode(Error(code=ERR_ALREADY_AUTHENTICATED, message="already authenticated", id=frame.id))
            )

    async def subscribe(self, conn: Connection, frame: Subscribe) -> None:
        """Register the subscriptions, send each device's latest values, then ``ack``, then live events."""
        devices = list(dict.fromkeys(frame.devices))
        new = [d for d in devices if d not in conn.filters]
        limit = self.settings.realtime_max_subscriptions
        if len(conn.filters) + len(new) > limit:
            message = f"at most {limit} subscriptions per connection"
            self._refuse(conn, Error(code=ERR_TOO_MANY, message=message, id=frame.id))
            return
        subject = conn.principal.subject
        held = self._subscriptions_of.get(subject, 0)
        per_principal = self.settings.realtime_max_subscriptions_per_principal
        if held + len(new) > per_principal:
            message = f"at most {per_principal} subscriptions per credential, over all its connections"
            self._refuse(conn, Error(code=ERR_TOO_MANY, message=message, id=frame.id))
            return
        # Reserved while the device check awaits, so the credential's other connections cannot all pass
        # the same check meanwhile; given back unless the subscriptions are made.
        self._subscriptions_of[subject] = held + len(new)
        admitted = False
        try:
            error = await self._check_devices(
                [d for d in new if d != WILDCARD], frame, subject, conn.tenant_id
            )
            if error is not None:
                self._refuse(conn, error)
                return
            admitted = True
        finally:
            if not admitted:
                self._forget_subscriptions(subject, len(new))
        wanted: MetricFilter = None
        if frame.metrics or frame.types:
            wanted = EventFilter(
                frozenset(frame.metrics) if frame.metrics else None,
                frozenset(frame.types) if frame.types else None,
            )
        # Readings (stored ones and the snapshot) only when telemetry is among the wanted types.
        readings = frame.types is None or "telemetry" in frame.types
        snapshot_of = [d for d in devices if d != WILDCARD] if readings else []
        metric_names = wanted.metrics if wanted is not None else None
        conn.hold()
        try:
            for device_id in devices:
                conn.filters[device_id] = wanted
            metrics.SUBSCRIPTIONS.inc(len(new))
            # Live first (held back), then the stored readings and the snapshot: nothing falls in between.
            await self.hub.add(conn, devices)
            if frame.since is None:
                for snapshot in await self.latest(snapshot_of, metric_names):
                    conn.send_now(snapshot)
                conn.send_now(encode(Ack(id=frame.id)))
            else:
                if readings:
                    ack = await self._backfill(conn, frame, devices, frame.since, metric_names)
                else:
                    ack = Ack(id=frame.id, backfilled=0, truncated=False)
                for snapshot in await self.latest(snapshot_of, metric_names):
                    await conn.send_paced(snapshot)
                await conn.send_paced(encode(ack))
                await conn.release_paced()
        finally:
            conn.release()

    async def _backfill(
        self,
        conn: Connection,
        frame: Subscribe,
        devices: list[str],
        since: datetime,
        wanted: frozenset[str] | None,
    ) -> Ack:
        """Send the readings stored after ``since`` (of the connection's tenant only) as ``telemetry``
        frames with ``backfill: true``, remember them for the seam, and return the ``ack`` saying how many."""
        limit = self.settings.realtime_max_backfill
        try:
            found = await stored_readings(
                self.pool,
                conn.tenant_id,
                None if WILDCARD in devices else devices,
                since,
                None if wanted is None else sorted(wanted),
                limit,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("could not read the readings to backfill", error=str(exc))
            metrics.BACKFILL_TRUNCATED.inc()
            return Ack(id=frame.id, backfilled=0, truncated=True)
        for reading in found.readings:
            await conn.send_paced(
                encode(BackfillTelemetry(device_id=reading.device_id, ts=reading.ts, metrics=reading.metrics))
            )
        seam = conn.seam if conn.seam is not None and not conn.seam.expired else Seam()
        seam.add(found.readings)
        conn.seam = seam
        metrics.BACKFILL_READINGS.inc(len(found.readings))
        if found.truncated:
            metrics.BACKFILL_TRUNCATED.inc()
        return Ack(id=frame.id, backfilled=len(found.readings), truncated=found.truncated)

    async def unsubscribe(self, conn: Connection, frame: Unsubscribe) -> None:
        removed = [d for d in dict.fromkeys(frame.devices) if conn.filters.pop(d, False) is not False]
        metrics.SUBSCRIPTIONS.dec(len(removed))
        self._forget_subscriptions(conn.principal.subject, len(removed))
        await self.hub.remove(conn, removed)
        conn.send_now(encode(Ack(id=frame.id)))

    async def _check_devices(
        self, device_ids: list[str], frame: Subscribe, subject: str, tenant_id: str
    ) -> Error | None:
        """An ``error`` for a subscribe naming devices that are not registered in the connection's tenant
        (a device of another tenant is answered exactly like one that does not exist), that cannot be
        checked, or that its credential may not ask about now (``IOT_REALTIME_DEVICE_CHECKS_PER_MINUTE``)."""
        if self.devices.uncached(tenant_id, device_ids) and not self.device_checks.take(subject):
            per_minute = self.settings.realtime_device_checks_per_minute
            message = f"at most {per_minute} subscribe frames per minute with devices not checked lately"
            return Error(code=ERR_RATE_LIMITED, message=message + ", try again shortly", id=frame.id)
        try:
            unknown = await self.devices.unknown(tenant_id, device_ids)
        except (OSError, asyncpg.PostgresError) as exc:
            log.error("could not check device ids", error=str(exc))
            return Error(code=ERR_UNAVAILABLE, message="could not check the devices, try again", id=frame.id)
        if not unknown:
            return None
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        message = f"{len(unknown)} unknown device(s): {shown}"
        return Error(code=ERR_UNKNOWN_DEVICE, message=message, id=frame.id, devices=unknown)

    @staticmethod
    def _refuse(conn: Connection, error: Error) -> None:
        metrics.REFUSED_SUBSCRIPTIONS.labels(error.code).inc()
        conn.send_now(encode(error))

    def _forget_subscriptions(self, subject: str, count: int) -> None:
        remaining = self._subscriptions_of.get(subject, 0) - count
        if remaining > 0:
            self._subscriptions_of[subject] = remaining
        else:
            self._subscriptions_of.pop(subject, None)

    async def latest(self, devices: list[str], wanted: frozenset[str] | None) -> list[bytes]:
        """``latest`` frames from the ``{prefix}:latest:{device_id}`` hashes (one round trip for all)."""
        if not devices:
            return []
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for device_id in devices:
                    pipe.hgetall(self.names.latest_key(device_id))
                    pipe.hget(self.names.state_key(device_id), "event")
                answers: list[Any] = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("latest values unavailable", error=str(exc))
            return []
        frames = []
        hashes: list[dict[bytes, bytes]] = answers[0::2]
        states: list[bytes | None] = answers[1::2]
        for device_id, fields, state_raw in zip(devices, hashes, states, strict=True):
            values: dict[str, LatestMetric] = {}
            for name_bytes, raw in fields.items():
                name = name_bytes.decode()
                if wanted is not None and name not in wanted:
                    continue
                try:
                    value = _latest_decoder.decode(raw)
                except msgspec.MsgspecError:
                    continue
                values[name] = LatestMetric(value=value.value, ts=value.ts)
            frames.append(encode(Latest(device_id=device_id, metrics=values, state=_state(state_raw))))
        return frames

    # -- lifecycle -----------------------------------------------------------------------------------

    async def release(self, conn: Connection) -> None:
        """Forget a connection whose socket is closed."""
        self.connections.discard(conn)
        metrics.CONNECTIONS.dec()
        subject = conn.principal.subject
        left = self._connections_of.get(subject, 0) - 1
        if left > 0:
            self._connections_of[subject] = left
        else:
            self._connections_of.pop(subject, None)
        selectors = list(conn.filters)
        conn.filters.clear()
        metrics.SUBSCRIPTIONS.dec(len(selectors))
        self._forget_subscriptions(subject, len(selectors))
        await self.hub.remove(conn, selectors)

    async def close_all(self) -> None:
        """Close every socket with 1001 "going away", so clients reconnect to another replica."""
        closing = [c.close(CLOSE_GOING_AWAY, "server shutting down") for c in list(self.connections)]
        if closing:
            log.info("closing connections", count=len(closing))
            await asyncio.gather(*closing, return_exceptions=True)


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """``GET /ws``: check origin and credential, then serve frames until either side closes."""
    gateway: Gateway = request.app[GATEWAY]
    settings = gateway.settings
    if gateway.sockets >= settings.realtime_max_connections:
        # Refused before the upgrade: a full replica spends nothing on it, and the load balancer (or the
        # client's backoff) tries again.
        metrics.REFUSED.labels("503").inc()
        return web.Response(
            status=503,
            text="too many connections on this server, try again later\n",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    gateway.sockets += 1
    metrics.SOCKETS.inc()
    try:
        return await _serve(gateway, request)
    finally:
        gateway.sockets -= 1
        metrics.SOCKETS.dec()


async def _serve(gateway: Gateway, request: web.Request) -> web.WebSocketResponse:
    settings = gateway.settings
    ws = web.WebSocketResponse(
        heartbeat=settings.realtime_heartbeat_s,
        compress=False,  # per-message deflate costs CPU and ~100 KiB per socket: too much at 10k sockets
        max_msg_size=MAX_WIRE_FRAME_BYTES,
        timeout=settings.realtime_close_timeout_s,
    )
    await ws.prepare(request)
    try:
        gateway.check_origin(request.headers.get("Origin"))
        token = request.query.get("token")
        auth_frame = None if token else await gateway.await_auth_frame(ws)
        credential = token or (auth_frame.token if auth_frame else "")
        peer = client_address(request.remote, request.headers.get("X-Forwarded-For"), gateway.trusted_proxies)
        principal = await gateway.authenticate(credential, peer)
        requested = request.query.get("tenant") or (auth_frame.tenant if auth_frame else None)
        tenant_id = await gateway.tenant_for(principal, requested)
        gateway.check_admission(principal)
    except Refused as refused:
        metrics.REFUSED.labels(str(refused.code)).inc()
        log.debug("connection refused", code=refused.code, reason=refused.reason, peer=request.remote)
        await ws.close(code=refused.code, message=refused.reason.encode()[:123])
        return ws
    conn = Connection(
        ws,
        request.transport,
        principal,
        tenant_id=tenant_id,
        queue_size=settings.realtime_queue_size,
        close_timeout=settings.realtime_close_timeout_s,
    )
    # Registered right after check_admission (no await between), and given back by the finally whatever
    # happens from here on, so a failure while starting cannot leak the credential's connection count.
    gateway.register(conn)
    try:
        log.debug("connection opened", subject=principal.subject, tenant=tenant_id, peer=request.remote)
        conn.start()
        if auth_frame is not None:
            conn.send_now(encode(Ack(id=auth_frame.id)))
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await gateway.handle_text(conn, message.data)
            elif message.type is WSMsgType.BINARY:
                gateway.handle_binary(conn)
    finally:
        await gateway.release(conn)
        await conn.close(ws.close_code or 1000, "")
        log.debug("connection closed", subject=principal.subject, code=ws.close_code)
    return ws
