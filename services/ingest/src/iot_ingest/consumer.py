"""The MQTT edge: a gmqtt client on the shared subscriptions, translating each message into a delivery.

gmqtt runs an ``async`` on_message handler as its own task (``asyncio.ensure_future``) and, with
``optimistic_acknowledgement=False``, sends the PUBACK from that task's done-callback with the value it
returns. So many messages wait in one batch at once, and each PUBACK leaves only after its batch commits.
The broker's in-flight window is the Receive Maximum we announce (``IOT_INGEST_MAX_IN_FLIGHT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from datetime import UTC, datetime
from typing import Any, Final

import structlog
from gmqtt import Client, Subscription

from iot_common.commands import InvalidAck, decode_ack
from iot_common.mqtt import MqttEndpoint, PubackTracker, PublishError, publish_acked, reason_text
from iot_common.topics import (
    COMMAND_ACK_FILTER,
    COMMAND_ACK_SUFFIX,
    COMMAND_PREFIX,
    STATUS_FILTER,
    STATUS_PREFIX,
    TELEMETRY_FILTER,
    TELEMETRY_PREFIX,
    device_id_from_topic,
    shared_subscription,
)
from iot_ingest import metrics
from iot_ingest.batcher import Batcher, BatcherClosed
from iot_ingest.payload import Limits, Reject, parse_status, parse_telemetry
from iot_ingest.plan import Delivery

log = structlog.stdlib.get_logger(__name__)

RECONNECT_MIN_S: Final = 0.5
# Label children bound once: .labels() costs more than the increment on the per-message path.
_RECEIVED_TELEMETRY: Final = metrics.MESSAGES_RECEIVED.labels("telemetry")
_RECEIVED_STATUS: Final = metrics.MESSAGES_RECEIVED.labels("status")
_RECEIVED_ACK: Final = metrics.MESSAGES_RECEIVED.labels("command_ack")
RECONNECT_MAX_S: Final = 30.0
SUBSCRIBE_RETRY_S: Final = 30.0


class NotAcknowledged(Exception):
    """Raised by the handler to withhold the PUBACK: the broker redelivers the message later."""


def default_client_id() -> str:
    """``iot-ingest-{host name}``: stable across restarts of one pod or host, distinct between replicas."""
    host = "".join(c if c.isalnum() or c in "_.:-" else "-" for c in socket.gethostname())
    return f"iot-ingest-{host}"[:64]


def translate(topic: str, payload: bytes, received_at: datetime, limits: Limits) -> Delivery:
    """One MQTT message as a :class:`Delivery`: readings or a status, and rejects with reasons."""
    device_id = device_id_from_topic(topic, TELEMETRY_PREFIX)
    if device_id is not None:
        _RECEIVED_TELEMETRY.inc()
        parsed = parse_telemetry(device_id, payload, received_at, limits)
        return Delivery(topic, device_id, received_at, payload, parsed.readings, parsed.rejects)
    device_id = device_id_from_topic(topic, STATUS_PREFIX)
    if device_id is not None:
        _RECEIVED_STATUS.inc()
        status = parse_status(payload, limits)
        if isinstance(status, Reject):
            return Delivery(topic, device_id, received_at, payload, rejects=[status])
        return Delivery(topic, device_id, received_at, payload, status=status)
    device_id = device_id_from_topic(topic, COMMAND_PREFIX, COMMAND_ACK_SUFFIX)
    if device_id is not None:
        _RECEIVED_ACK.inc()
        if len(payload) > limits.max_payload_bytes:
            reject = Reject("payload_too_large", f"{len(payload)} bytes, limit {limits.max_payload_bytes}")
            return Delivery(topic, device_id, received_at, payload, rejects=[reject])
        try:
            ack = decode_ack(payload)
        except InvalidAck as exc:
            return Delivery(
                topic, device_id, received_at, payload, rejects=[Reject("invalid_command_ack", str(exc))]
            )
        return Delivery(topic, device_id, received_at, payload, ack=ack)
    metrics.MESSAGES_RECEIVED.labels("other").inc()
    reject = Reject(
        "invalid_topic",
        "expected devices/telemetry/{id}, devices/status/{id} or devices/commands/{id}/ack",
    )
    return Delivery(topic, None, received_at, payload, rejects=[reject])


class Consumer:
    """Owns the gmqtt client: connects with backoff, subscribes, and feeds the batcher."""

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
    ) -> None:
        self._endpoint = MqttEndpoint.parse(mqtt_url)
        self._publish_timeout_s = publish_timeout_s
        self._tracker = PubackTracker()
        # Topic filter -> reason code of its last SUBACK (< 0x80 granted); absent until the first SUBACK.
        self.subacks: dict[str, int] = {}
        self._retry: asyncio.TimerHandle | None = None
        self._batcher = batcher
        self._limits = limits
        self._accepting = True
        self._generation = 0
        self._reconnect_delay = RECONNECT_MIN_S
        self._subscribed = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.connected = asyncio.Event()
        self.subscriptions = [
            Subscription(shared_subscription(share_group, TELEMETRY_FILTER), qos=1),
            Subscription(shared_subscription(share_group, STATUS_FILTER), qos=1),
            Subscription(shared_subscription(share_group, COMMAND_ACK_FILTER), qos=1),
        ]
        self.client = Client(
            client_id,
            clean_session=False,
            optimistic_acknowledgement=False,
            session_expiry_interval=session_expiry_s,
            receive_maximum=max_in_flight,
            persistent_storage=self._tracker,
        )
        self._tracker.attach(self.client)
        self._endpoint.authenticate(self.client)
        self.client.set_config({"reconnect_retries": -1, "reconnect_delay": RECONNECT_MIN_S})
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    async def connect(self, stop: asyncio.Event) -> bool:
        """Connect, retrying with backoff until it works or ``stop`` is set; False when stopped."""
        delay = RECONNECT_MIN_S
        while not stop.is_set():
            try:
                await self._endpoint.connect(self.client)
                return True
            except Exception as exc:
                log.warning("mqtt connect failed, retrying", error=str(exc), retry_in_s=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
        return False

    def stop_accepting(self) -> None:
        """New messages are left unacknowledged (the broker keeps them for this session or redelivers)."""
        self._accepting = False

    async def wait_idle(self) -> None:
        """Wait until every handler has returned and gmqtt's done-callbacks have written the PUBACKs."""
        await self._idle.wait()
        for _ in range(2):
            await asyncio.sleep(0)

    async def publish(self, topic: str, payload: bytes) -> None:
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
        await publish_acked(self.client, self._tracker, topic, payload, self._publish_timeout_s)

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

    async def disconnect(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        with contextlib.suppress(Exception):
            await self.client.disconnect()
        metrics.MQTT_CONNECTED.set(0)

    def _on_connect(self, client: Client, flags: int, rc: int, properties: Any) -> None:
        self._generation += 1
        self._reconnect_delay = RECONNECT_MIN_S
        client.reconnect_delay = RECONNECT_MIN_S
        if self._subscribed:
            for sub in client.subscriptions:
                client.resubscribe(sub)
        else:
            client.subscribe(self.subscriptions)
            self._subscribed = True
        self.connected.set()
        metrics.MQTT_CONNECTED.set(1)
        log.info(
            "mqtt connected", session_present=bool(flags), subscriptions=[s.topic for s in self.subscriptions]
        )

    def _on_disconnect(self, client: Client, packet: Any, exc: Any = None) -> None:
        self.connected.clear()
        metrics.MQTT_CONNECTED.set(0)
        # gmqtt reconnects by itself after reconnect_delay; doubling it each time gives the backoff.
        client.reconnect_delay = self._reconnect_delay
        self._reconnect_delay = min(self._reconnect_delay * 2, RECONNECT_MAX_S)
        if self._accepting:
            log.warning("mqtt disconnected, reconnecting", retry_in_s=client.reconnect_delay)

    async def _on_message(
        self, client: Client, topic: str | bytes, payload: bytes, qos: int, properties: Any
    ) -> int:
        generation = self._generation
        if isinstance(topic, bytes):
            topic = topic.decode("utf-8", errors="replace")
        if not self._accepting:
            raise NotAcknowledged("stopping")
        delivery = translate(topic, payload, datetime.now(UTC), self._limits)
        metrics.IN_FLIGHT.inc()
        self._active += 1
        self._idle.clear()
        try:
            await self._batcher.submit(delivery)
        finally:
            metrics.IN_FLIGHT.dec()
            self._active -= 1
            if not self._active:
                self._idle.set()
        if generation != self._generation:
            # The connection it came on is gone: the broker redelivers it on the new one with the same
            # packet id, which a PUBACK sent now might acknowledge before that copy is stored.
            raise NotAcknowledged("connection replaced")
        return 0


def ignore_not_acknowledged(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Loop exception handler: a withheld PUBACK surfaces in gmqtt's done-callback; it is not an error."""
    exc = context.get("exception")
    if isinstance(exc, NotAcknowledged | BatcherClosed | asyncio.CancelledError):
        return
    loop.default_exception_handler(context)
