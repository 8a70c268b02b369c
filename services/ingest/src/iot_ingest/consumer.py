"""The MQTT edge: a gmqtt client on the shared subscriptions, translating each message into a delivery.

Each PUBLISH is handled synchronously (:mod:`iot_ingest.receive`: no task per message): translated, put
in the batcher, and acknowledged from its batch's done-callback, once the batch is committed; the PUBACKs
of a batch leave in one write. So many messages wait in one batch at once, and each PUBACK leaves only
after its batch commits. The broker's in-flight window is the Receive Maximum we announce
(``IOT_INGEST_MAX_IN_FLIGHT``).

A message that is never acknowledged holds one slot of that window until the connection ends (and comes
back on the next one): so nothing a device sends may leave it unacknowledged. Any exception while
translating a message becomes a dead letter (:func:`translate`), and a failure to store one is recorded
and acknowledged (:meth:`Consumer._store_failed`); only a stopping service withholds PUBACKs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec
import structlog
from gmqtt import Client, Subscription

from iot_common.commands import InvalidAck, decode_ack
from iot_common.mqtt import MqttConnection, PublishError, reason_text
from iot_common.state import StateProblem, decode_reported
from iot_common.topics import (
    COMMAND_ACK_FILTER,
    COMMAND_ACK_SUFFIX,
    COMMAND_PREFIX,
    STATE_PREFIX,
    STATE_REPORTED_FILTER,
    STATE_REPORTED_SUFFIX,
    STATUS_FILTER,
    STATUS_PREFIX,
    TELEMETRY_FILTER,
    TELEMETRY_PREFIX,
    device_id_from_topic,
    shared_subscription,
)
from iot_ingest import metrics
from iot_ingest.batcher import Batcher, BatcherClosed
from iot_ingest.payload import Limits, Reject, RejectReason, parse_status, parse_telemetry
from iot_ingest.plan import Delivery, Outcome, payload_excerpt
from iot_ingest.receive import Link, install

log = structlog.stdlib.get_logger(__name__)

# Label children bound once: .labels() costs more than the increment on the per-message path.
_RECEIVED_TELEMETRY: Final = metrics.MESSAGES_RECEIVED.labels("telemetry")
_RECEIVED_STATUS: Final = metrics.MESSAGES_RECEIVED.labels("status")
_RECEIVED_ACK: Final = metrics.MESSAGES_RECEIVED.labels("command_ack")
_RECEIVED_STATE: Final = metrics.MESSAGES_RECEIVED.labels("state_reported")
SUBSCRIBE_RETRY_S: Final = 30.0
CLIENT_ID_MAX: Final = 64


def _client_id_part(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_.:-" else "-" for c in text)


def default_client_id(share_group: str = "ingest", database_url: str = "") -> str:
    """``iot-ingest-{host}-{share group}-{hash}``, at most 64 characters.

    Stable across restarts of one pod or host (nothing random), distinct between replicas (host name),
    and between two deployments on one host: the hash covers the host name, the share group and the
    database (server, port, name; not the password), so a second process with another share group or
    database never takes over this one's persistent session.
    """
    host = socket.gethostname()
    db = urlsplit(database_url)
    try:
        db_port = db.port
    except ValueError:
        db_port = None
    identity = "\n".join((host, share_group, db.hostname or "", str(db_port or ""), db.path, db.query))
    digest = hashlib.sha256(identity.encode()).hexdigest()[:8]
    group = _client_id_part(share_group or "unshared")[:19]
    head = f"iot-ingest-{_client_id_part(host)[:24]}-{group}"
    return f"{head}-{digest}"  # 11 + 24 + 1 + 19 + 1 + 8 = 64 characters at most


class DeviceQuota:
    """A token bucket per device: ``rate`` readings per second, up to ``burst`` at once.

    A telemetry message costs one token per reading (at least one, so that invalid ones count too); a
    status message or a command answer costs one. A message the bucket cannot pay for is not parsed.

    Memory is bounded: a bucket idle long enough to be full again is the same as a new one, so such
    buckets are evicted (oldest use first) as new devices arrive, and at most ``max_devices`` are kept
    (the least recently used goes first).
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        max_devices: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.max_devices = max_devices
        self._clock = clock
        self._refill_s = burst / rate
        self.detail = f"device over its quota of {rate:g} readings/s (burst {burst:g})"
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def bucket(self, device_id: str) -> Bucket:
        """The device's bucket, refilled up to now: a message that is checked, parsed and then charged
        (:meth:`Bucket.take`) costs one lookup and one refill."""
        now = self._clock()
        bucket = self._buckets.get(device_id)
        if bucket is None:
            self._evict(now)
            bucket = Bucket(self.burst, now)
            self._buckets[device_id] = bucket
            return bucket
        self._buckets.move_to_end(device_id)
        tokens = bucket.tokens + (now - bucket.at) * self.rate
        bucket.tokens = tokens if tokens < self.burst else self.burst
        bucket.at = now
        return bucket

    def _evict(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            oldest_id, oldest = next(iter(buckets.items()))
            if now - oldest.at < self._refill_s and len(buckets) < self.max_devices:
                return
            del buckets[oldest_id]

    def take(self, device_id: str, count: int) -> bool:
        """Take ``count`` readings from the device's bucket; False (and nothing taken) if it lacks them."""
        return self.bucket(device_id).take(count)


class Bucket:
    """One device's tokens (readings it may still send) as of ``at`` (the quota's clock)."""

    __slots__ = ("at", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at

    def take(self, count: int) -> bool:
        """Take ``count`` readings; False (and nothing taken) if the bucket lacks them."""
        if self.tokens < count:
            return False
        self.tokens -= count
        return True


def _any_device_id(topic: str) -> str | None:
    return (
        device_id_from_topic(topic, TELEMETRY_PREFIX)
        or device_id_from_topic(topic, STATUS_PREFIX)
        or device_id_from_topic(topic, COMMAND_PREFIX, COMMAND_ACK_SUFFIX)
        or device_id_from_topic(topic, STATE_PREFIX, STATE_REPORTED_SUFFIX)
    )


def translate(
    topic: str,
    payload: bytes,
    received_at: datetime,
    limits: Limits,
    *,
    retained: bool = False,
    quota: DeviceQuota | None = None,
) -> Delivery:
    """One MQTT message as a :class:`Delivery`: readings or a status, and rejects with reasons.

    Never raises: whatever goes wrong translating a message makes it a dead letter (``too_deep``,
    ``malformed_json`` or ``handler_error``), counted in ``iot_ingest_handler_errors_total``.
    """
    try:
        return _translate(topic, payload, received_at, limits, retained, quota)
    except Exception as exc:
        metrics.HANDLER_ERRORS.labels("translate").inc()
        reason: RejectReason = "handler_error"
        if isinstance(exc, RecursionError):
            reason = "too_deep"
        elif isinstance(exc, UnicodeDecodeError):
            reason = "malformed_json"
        detail = f"{type(exc).__name__}: {exc}"[:500]
        log.warning("message handler failed, dead-lettered", topic=topic[:200], reason=reason, error=detail)
        device_id = None
        with contextlib.suppress(Exception):
            device_id = _any_device_id(topic)
        return Delivery(topic, device_id, received_at, payload, rejects=[Reject(reason, detail)])


def _translate(
    topic: str,
    payload: bytes,
    received_at: datetime,
    limits: Limits,
    retained: bool,
    quota: DeviceQuota | None,
) -> Delivery:
    if retained:
        # Delivered because ingest (re)subscribed, not because the device just sent it: storing it would
        # add the same reading again, stamped with the time of this connection.
        metrics.MESSAGES_RECEIVED.labels("retained").inc()
        reject = Reject("retained", "retained message, delivered on subscribe; not a new reading")
        return Delivery(topic, _any_device_id(topic), received_at, payload, rejects=[reject])
    device_id = device_id_from_topic(topic, TELEMETRY_PREFIX)
    if device_id is not None:
        _RECEIVED_TELEMETRY.inc()
        if quota is None:
            parsed = parse_telemetry(device_id, payload, received_at, limits)
        else:
            # Checked before parsing (a flood is not parsed), charged by what the message holds.
            bucket = quota.bucket(device_id)
            if bucket.tokens < 1:
                return _rate_limited(topic, device_id, received_at, payload, quota, 1)
            parsed = parse_telemetry(device_id, payload, received_at, limits)
            if not bucket.take(max(1, len(parsed.readings))):
                return _rate_limited(topic, device_id, received_at, payload, quota, len(parsed.readings))
        return Delivery(topic, device_id, received_at, payload, parsed.readings, parsed.rejects)
    device_id = device_id_from_topic(topic, STATUS_PREFIX)
    if device_id is not None:
        _RECEIVED_STATUS.inc()
        if quota is not None and not quota.take(device_id, 1):
            return _rate_limited(topic, device_id, received_at, payload, quota, 1)
        status = parse_status(payload, limits)
        if isinstance(status, Reject):
            return Delivery(topic, device_id, received_at, payload, rejects=[status])
        return Delivery(topic, device_id, received_at, payload, status=status)
    device_id = device_id_from_topic(topic, COMMAND_PREFIX, COMMAND_ACK_SUFFIX)
    if device_id is not None:
        _RECEIVED_ACK.inc()
        if quota is not None and not quota.take(device_id, 1):
            return _rate_limited(topic, device_id, received_at, payload, quota, 1)
        if len(payload) > limits.max_payload_bytes:
            reject = Reject("payload_too_large", f"{len(payload)} bytes, limit {limits.max_payload_bytes}")
            return Delivery(topic, device_id, received_at, payload, rejects=[reject])
        try:
            ack = decode_ack(payload)
        except InvalidAck as exc:
            return Delivery(topic, device_id, received_at, payload, rejects=[Reject(exc.reason, str(exc))])
        return Delivery(topic, device_id, received_at, payload, ack=ack)
    device_id = device_id_from_topic(topic, STATE_PREFIX, STATE_REPORTED_SUFFIX)
    if device_id is not None:
        _RECEIVED_STATE.inc()
        if quota is not None and not quota.take(device_id, 1):
            return _rate_limited(topic, device_id, received_at, payload, quota, 1)
        return state_report(topic, device_id, received_at, payload)
    metrics.MESSAGES_RECEIVED.labels("other").inc()
    reject = Reject(
        "invalid_topic",
        "expected devices/telemetry/{id}, devices/status/{id}, devices/commands/{id}/ack"
        " or devices/state/{id}/reported",
    )
    return Delivery(topic, None, received_at, payload, rejects=[reject])


def state_report(
    topic: str, device_id: str, received_at: datetime, payload: bytes, outcome: Outcome | None = None
) -> Delivery:
    """A state report (``{"reported": {...}, "version": N}``), or its dead letter naming what is wrong
    (MQTT ``devices/state/{id}/reported``; HTTP ingest, with the ``outcome`` its answer waits for)."""
    try:
        report = decode_reported(payload)
    except StateProblem as exc:
        reason: RejectReason = "invalid_state_report"
        if exc.code == "too_large":
            reason = "payload_too_large"
        elif exc.code == "too_deep":
            reason = "too_deep"
        return Delivery(
            topic, device_id, received_at, payload, rejects=[Reject(reason, str(exc))], outcome=outcome
        )
    except msgspec.DecodeError as exc:
        reason = "invalid_state_report" if isinstance(exc, msgspec.ValidationError) else "malformed_json"
        return Delivery(
            topic, device_id, received_at, payload, rejects=[Reject(reason, str(exc)[:500])], outcome=outcome
        )
    return Delivery(topic, device_id, received_at, payload, report=report, outcome=outcome)


def _rate_limited(
    topic: str, device_id: str, received_at: datetime, payload: bytes, quota: DeviceQuota, readings: int
) -> Delivery:
    detail = quota.detail if readings <= 1 else f"{quota.detail}; message of {readings} readings"
    return Delivery(topic, device_id, received_at, payload, rejects=[Reject("rate_limited", detail)])


class Consumer:
    """Owns the broker connection (:class:`~iot_common.mqtt.MqttConnection`): subscribes on every new
    connection, and feeds the batcher."""

    def __init__(
        self,
        *,
        mqtt_url: str,
        client_id: str,
        share_group: str,
        session_expiry_s: int,
        max_in_flight: int,
        batcher: Batcher[Delivery],
        limits: Limits,
        publish_timeout_s: float = 5.0,
        quota: DeviceQuota | None = None,
        adopting: bool = False,
    ) -> None:
        """``adopting``: this connection resumes a gone replica's session (``client_id`` is that replica's)
        to store what is queued in it, then ends it; it neither subscribes nor reconnects."""
        self._publish_timeout_s = publish_timeout_s
        # Topic filter -> reason code of its last SUBACK (< 0x80 granted); absent until the first SUBACK.
        self.subacks: dict[str, int] = {}
        self._retry: asyncio.TimerHandle | None = None
        self._batcher = batcher
        self._limits = limits
        self._quota = quota
        self._max_unawaited = max_in_flight
        self._accepting = True
        self._generation = 0
        self._subscribed = False
        self._tokens = itertools.count()
        # When each message in flight was taken (monotonic), in arrival order: the first is the oldest.
        self._in_flight: dict[int, float] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._adopting = adopting
        self._last_message = time.monotonic()
        self._unsubacks: dict[int, asyncio.Future[tuple[int, ...]]] = {}
        # No share group: plain subscriptions, for a broker without MQTT 5 shared subscriptions (one
        # ingest process only, as every subscriber gets every message).
        self.subscriptions = [
            Subscription(shared_subscription(share_group, f) if share_group else f, qos=1)
            for f in (TELEMETRY_FILTER, STATUS_FILTER, COMMAND_ACK_FILTER, STATE_REPORTED_FILTER)
        ]
        self.mqtt = MqttConnection(
            mqtt_url,
            client_id,
            log=log.bind(adopted=client_id) if adopting else log,
            gauge=None if adopting else metrics.MQTT_CONNECTED,
            on_connect=self._on_connect,
            connected_fields={"subscriptions": [s.topic for s in self.subscriptions]},
            reconnect=not adopting,
            clean_session=False,
            optimistic_acknowledgement=False,
            session_expiry_interval=session_expiry_s,
            receive_maximum=max_in_flight,
        )
        self.client = self.mqtt.client
        self.connected = self.mqtt.connected
        self.acks = install(self.client, self._receive)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        self.session_present = False
        self.received = 0

    async def connect(self, stop: asyncio.Event) -> bool:
        """Connect, retrying with backoff until it works or ``stop`` is set; False when stopped."""
        return await self.mqtt.connect(stop)

    @property
    def accepting(self) -> bool:
        """False once the service stops: no new message (nor HTTP request) is taken."""
        return self._accepting

    def stop_accepting(self) -> None:
        """New messages are left unacknowledged (the broker keeps them for this session or redelivers)."""
        self._accepting = False
        self.mqtt.quiet = True

    async def wait_idle(self) -> None:
        """Wait until every message taken is stored and its PUBACK written (or withheld)."""
        await self._idle.wait()
        self.acks.flush()

    def in_flight(self) -> int:
        """Messages received and not yet acknowledged (the ``iot_ingest_in_flight`` gauge)."""
        return len(self._in_flight)

    def oldest_in_flight_s(self) -> float:
        """Seconds the oldest message still unacknowledged has been in this process; 0 when none."""
        for started in self._in_flight.values():
            return time.monotonic() - started
        return 0.0

    def stuck(self, after_s: float) -> int:
        """Messages in flight for longer than ``after_s`` (counted up to the first younger one)."""
        limit = time.monotonic() - after_s
        count = 0
        for started in self._in_flight.values():
            if started > limit:
                break
            count += 1
        return count

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 on this client's connection (commands to devices) and wait for the PUBACK.

        Waits up to the publish timeout for a connection, then as long again for the PUBACK. Raises
        :class:`~iot_common.mqtt.PublishRefused` when the broker refused the message (PUBACK reason code
        >= 0x80, e.g. "not authorized (135)"), :class:`~iot_common.mqtt.PublishError` when it is not
        connected or no PUBACK comes in time. Reason 0x10 (no matching subscribers) is success.
        """
        try:
            await asyncio.wait_for(self.connected.wait(), self._publish_timeout_s)
        except TimeoutError:
            raise PublishError("not connected to the MQTT broker", "not_connected") from None
        properties = {"retain": True} if retain else {}
        await self.mqtt.publish(topic, payload, self._publish_timeout_s, **properties)

    def check_subscriptions(self) -> None:
        """Readiness: raises unless the broker granted every subscription (its SUBACK was < 0x80)."""
        refused = [f"{t} ({reason_text(c)})" for t, c in self.subacks.items() if c >= 0x80]
        if refused:
            raise ConnectionError("subscription refused by the MQTT broker: " + ", ".join(refused))
        waiting = [s.topic for s in self.subscriptions if s.topic not in self.subacks]
        if waiting:
            raise ConnectionError("no SUBACK yet for " + ", ".join(waiting))

    def _on_subscribe(self, client: Client, mid: int, codes: tuple[int, ...], properties: Any) -> None:
        # gmqtt clears each subscription's packet id only after this callback.
        subs = [s for s in client.subscriptions if s.mid == mid]
        for sub, code in zip(subs, codes, strict=False):
            before = self.subacks.get(sub.topic)
            self.subacks[sub.topic] = code
            if code >= 0x80:
                log.error(
                    "mqtt subscription refused; not ready",
                    topic=sub.topic,
                    reason=reason_text(code),
                    retry_in_s=SUBSCRIBE_RETRY_S,
                )
            elif before is not None and before >= 0x80:
                log.info("mqtt subscription granted", topic=sub.topic)
        if any(c >= 0x80 for c in self.subacks.values()) and self._retry is None:
            # The broker's ACLs may be fixed at run time (dynamic security): ask again later.
            self._retry = asyncio.get_running_loop().call_later(SUBSCRIBE_RETRY_S, self._resubscribe_refused)

    def _resubscribe_refused(self) -> None:
        self._retry = None
        if not self.client.is_connected or not self._accepting:
            return
        for sub in self.client.subscriptions:
            if self.subacks.get(sub.topic, 0) >= 0x80:
                self.client.resubscribe(sub)

    async def unsubscribe(self, timeout_s: float) -> bool:
        """Unsubscribe every filter of this session and wait for the UNSUBACK: the broker then sends this
        session nothing new, only what it had already queued for it. Whether the UNSUBACK came."""
        if not self.mqtt.is_connected:
            return False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        future: asyncio.Future[tuple[int, ...]] = asyncio.get_running_loop().create_future()
        mid = self.client.unsubscribe([s.topic for s in self.subscriptions])
        self._unsubacks[mid] = future
        try:
            await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return False
        finally:
            self._unsubacks.pop(mid, None)
        return True

    async def wait_quiet(self, quiet_s: float, timeout_s: float) -> bool:
        """Wait until nothing is in flight and no message came for ``quiet_s`` (what the broker had queued
        for this session has been stored and acknowledged); False if that took longer than ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (now := time.monotonic()) < deadline:
            if not self.mqtt.is_connected:
                return False
            if not self._in_flight and now - self._last_message >= quiet_s:
                await self.wait_idle()
                return True
            await asyncio.sleep(min(quiet_s / 4, 0.1))
        return False

    async def disconnect(self, end_session: bool = False) -> None:
        """Disconnect; ``end_session``: the broker discards the session (nothing may queue for it)."""
        self.mqtt.quiet = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        await self.mqtt.close(end_session=end_session)

    def _on_unsubscribe(self, client: Client, mid: int, codes: tuple[int, ...]) -> None:
        future = self._unsubacks.get(mid)
        if future is not None and not future.done():
            future.set_result(tuple(codes))

    def _on_connect(self, client: Client, session_present: bool) -> None:
        self._generation += 1
        self.session_present = session_present
        if self._adopting:
            # The gone replica's session holds its subscriptions (and what is queued for them).
            return
        if self._subscribed:
            for sub in client.subscriptions:
                client.resubscribe(sub)
        else:
            client.subscribe(self.subscriptions)
            self._subscribed = True

    def _receive(
        self, link: Link | None, packet_id: int | None, topic: str, payload: bytes, dup: bool, retain: bool
    ) -> None:
        """One PUBLISH (``packet_id`` None: QoS 0), synchronously: translated, queued for its batch, and
        acknowledged on ``link`` once stored. Never raises."""
        self._last_message = time.monotonic()
        self.received += 1
        if not self._accepting:
            return  # left unacknowledged: the broker keeps it for this session or redelivers it
        delivery = translate(
            topic, payload, datetime.now(UTC), self._limits, retained=retain, quota=self._quota
        )
        if dup:
            delivery.redelivered = True
        try:
            future = self._batcher.submit_nowait(delivery)
        except BatcherClosed:
            return
        if (
            delivery.rejects
            and delivery.rejects[0].reason == "rate_limited"
            and self._batcher.pending <= self._max_unawaited
        ):
            # A flood past its quota: acknowledged at once, its dead letter written with the next batch.
            # Waiting for that commit would let the flood hold the in-flight window, and every other
            # device's messages queue behind it in the broker. Bounded: past max_unawaited waiting items,
            # these wait for their commit like any message.
            future.add_done_callback(_unawaited_done)
            if link is not None and packet_id is not None:
                self.acks.ack(link, packet_id)
            return
        token = next(self._tokens)
        self._in_flight[token] = time.monotonic()
        self._idle.clear()
        generation = self._generation
        future.add_done_callback(lambda f: self._stored(f, token, link, packet_id, generation, delivery))

    def _stored(
        self,
        future: asyncio.Future[None],
        token: int,
        link: Link | None,
        packet_id: int | None,
        generation: int,
        delivery: Delivery,
    ) -> None:
        """The batch of a message is committed (or failed): acknowledge it, unless the service stops or
        the connection it came on is gone (the broker redelivers it on the new one, with the same packet
        id, which a PUBACK sent now might acknowledge before that copy is stored)."""
        exc = None if future.cancelled() else future.exception()
        if exc is not None and not isinstance(exc, BatcherClosed):
            task = asyncio.create_task(self._store_failed(delivery, exc))
            task.add_done_callback(lambda t: self._stored(t, token, link, packet_id, generation, delivery))
            return
        del self._in_flight[token]
        if not self._in_flight:
            self._idle.set()
        if future.cancelled() or exc is not None:
            return
        if link is not None and packet_id is not None and generation == self._generation:
            self.acks.ack(link, packet_id)

    async def _store_failed(self, delivery: Delivery, exc: BaseException) -> None:
        """Storing ``delivery`` failed: record the message as a ``handler_error`` dead letter.

        The writer retries what PostgreSQL could not take for a while and isolates a message it refuses,
        so this is a last resort for a fault of the code: the message is then acknowledged all the same
        (logged with its payload if even its dead letter cannot be stored), never left holding a slot.
        Raises :class:`BatcherClosed` when the service stops meanwhile (no PUBACK then).
        """
        metrics.HANDLER_ERRORS.labels("store").inc()
        error = f"{type(exc).__name__}: {exc}"[:500]
        log.error("storing a message failed, writing it as a dead letter", topic=delivery.topic, error=error)
        letter = Delivery(
            delivery.topic,
            delivery.device_id,
            delivery.received_at,
            delivery.payload,
            rejects=[Reject("handler_error", f"storing failed: {error}")],
        )
        try:
            await self._batcher.submit(letter)
        except (BatcherClosed, asyncio.CancelledError):
            raise
        except Exception as exc2:
            log.error(
                "dead letter not stored either; message acknowledged and dropped",
                topic=delivery.topic,
                device_id=delivery.device_id,
                payload=payload_excerpt(delivery.payload),
                error=f"{type(exc2).__name__}: {exc2}"[:500],
            )


def _unawaited_done(future: asyncio.Future[None]) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None and not isinstance(exc, BatcherClosed):
        metrics.HANDLER_ERRORS.labels("store").inc()
        log.error("rate_limited dead letter not stored", error=f"{type(exc).__name__}: {exc}"[:500])
