"""The API's MQTT connection, used to publish commands to devices at QoS 1.

One gmqtt client per process, connected in the background from the lifespan (start-up never waits for
the broker) and reconnected by gmqtt with backoff. It uses a clean session: the API only publishes.

What "published" guarantees: gmqtt keeps every in-flight QoS 1 PUBLISH in a store keyed by packet id and
removes it when the broker's PUBACK arrives. :class:`~iot_common.mqtt.PubackTracker` is that store plus
one future per packet id resolved with the PUBACK's MQTT 5 reason code, so :meth:`CommandPublisher.publish`
returns only once the broker accepted the message, i.e. took responsibility for delivering it to the
subscribers it has (or queued for a persistent session); reason 0x10 "no matching subscribers" (the
device is offline) counts as accepted. It raises :class:`PublishRefused` when the PUBACK's reason code is
0x80 or more (e.g. 0x87 "not authorized": the broker's ACLs refused and dropped it), and
:class:`PublishError` when no connection is up, when the connection drops before the PUBACK (the clean
session discards the message, it is not replayed), or when no PUBACK comes within the timeout; in that
last case the broker may still deliver it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from typing import Any, Final

import structlog
from gmqtt import Client
from prometheus_client import Counter, Gauge

from iot_common.mqtt import MqttEndpoint, PubackTracker, PublishError, PublishRefused, publish_acked

log = structlog.stdlib.get_logger("iot_api.mqtt")
RECONNECT_MIN_S: Final = 0.5
RECONNECT_MAX_S: Final = 30.0
MQTT_CONNECTED = Gauge("iot_api_mqtt_connected", "1 while the API's MQTT connection is up")
COMMANDS_PUBLISHED = Counter(
    "iot_api_commands_published_total", "Command publications by outcome", ["outcome"]
)

__all__ = ["CommandPublisher", "PublishError", "PublishRefused"]


class CommandPublisher:
    """A persistent MQTT connection that publishes at QoS 1 and waits for the broker's PUBACK."""

    def __init__(self, mqtt_url: str, puback_timeout_s: float, client_id: str | None = None) -> None:
        self._endpoint = MqttEndpoint.parse(mqtt_url)
        self._timeout = puback_timeout_s
        self._tracker = PubackTracker()
        self._task: asyncio.Task[None] | None = None
        self._reconnect_delay = RECONNECT_MIN_S
        self.connected = asyncio.Event()
        host = socket.gethostname()[:32] or "api"
        self.client = Client(
            client_id or f"iot-api-{host}-{uuid.uuid4().hex[:8]}",
            clean_session=True,
            persistent_storage=self._tracker,
        )
        self._tracker.attach(self.client)
        self._endpoint.authenticate(self.client)
        self.client.set_config({"reconnect_retries": -1, "reconnect_delay": RECONNECT_MIN_S})
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect

    def start(self) -> None:
        """Connect in the background, retrying with backoff until the broker answers."""
        self._task = asyncio.create_task(self._connect_forever())

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the connection; whether it is up."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), timeout_s)
        return self.is_connected

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.client.disconnect()
        self.connected.clear()
        MQTT_CONNECTED.set(0)

    async def check(self) -> object:
        """Readiness check: raises unless connected."""
        if not self.is_connected:
            raise PublishError("not connected to the MQTT broker")
        return True

    @property
    def is_connected(self) -> bool:
        return self.connected.is_set() and bool(self.client.is_connected)

    async def publish(self, topic: str, payload: bytes, expiry_s: int | None = None) -> None:
        """Publish at QoS 1 and wait for the PUBACK; :class:`PublishError` (or :class:`PublishRefused`)
        unless the broker accepted the message."""
        if not self.is_connected:
            COMMANDS_PUBLISHED.labels("not_connected").inc()
            raise PublishError("not connected to the MQTT broker", "not_connected")
        properties: dict[str, Any] = {}
        if expiry_s is not None:
            # The broker drops the message instead of delivering it to a device that reconnects too late.
            properties["message_expiry_interval"] = expiry_s
        try:
            await publish_acked(self.client, self._tracker, topic, payload, self._timeout, **properties)
        except PublishRefused as exc:
            COMMANDS_PUBLISHED.labels("refused").inc()
            log.error("the MQTT broker refused a command", topic=topic, reason=str(exc))
            raise
        except PublishError as exc:
            COMMANDS_PUBLISHED.labels(exc.outcome).inc()
            raise
        COMMANDS_PUBLISHED.labels("acked").inc()

    async def _connect_forever(self) -> None:
        delay = RECONNECT_MIN_S
        while True:
            try:
                await self._endpoint.connect(self.client)
                return
            except Exception as exc:
                log.warning("mqtt connect failed, retrying", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)

    def _on_connect(self, client: Client, flags: int, rc: int, properties: Any) -> None:
        self._reconnect_delay = RECONNECT_MIN_S
        client.reconnect_delay = RECONNECT_MIN_S
        self.connected.set()
        MQTT_CONNECTED.set(1)
        log.info("mqtt connected")

    def _on_disconnect(self, client: Client, packet: Any, exc: Any = None) -> None:
        self.connected.clear()
        MQTT_CONNECTED.set(0)
        # gmqtt reconnects by itself after reconnect_delay; doubling it each time gives the backoff.
        client.reconnect_delay = self._reconnect_delay
        self._reconnect_delay = min(self._reconnect_delay * 2, RECONNECT_MAX_S)
        log.warning("mqtt disconnected, reconnecting", retry_in_s=client.reconnect_delay)
