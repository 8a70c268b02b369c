"""The API's MQTT connection, used to publish commands to devices at QoS 1.

One :class:`~iot_common.mqtt.MqttConnection` per process, connected in the background from the lifespan
(start-up never waits for the broker) and reconnected with backoff. It uses a clean session: the API
only publishes.

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

import socket
import uuid
from typing import Any

import structlog
from prometheus_client import Counter, Gauge

from iot_common.mqtt import MqttConnection, PublishError, PublishRefused

log = structlog.stdlib.get_logger("iot_api.mqtt")
MQTT_CONNECTED = Gauge("iot_api_mqtt_connected", "1 while the API's MQTT connection is up")
COMMANDS_PUBLISHED = Counter(
    "iot_api_commands_published_total", "Command publications by outcome", ["outcome"]
)

__all__ = ["CommandPublisher", "PublishError", "PublishRefused"]


class CommandPublisher:
    """A persistent MQTT connection that publishes at QoS 1 and waits for the broker's PUBACK."""

    def __init__(self, mqtt_url: str, puback_timeout_s: float, client_id: str | None = None) -> None:
        self._timeout = puback_timeout_s
        host = socket.gethostname()[:32] or "api"
        self.mqtt = MqttConnection(
            mqtt_url,
            client_id or f"iot-api-{host}-{uuid.uuid4().hex[:8]}",
            log=log,
            gauge=MQTT_CONNECTED,
            clean_session=True,
        )

    def start(self) -> None:
        """Connect in the background, retrying with backoff until the broker answers."""
        self.mqtt.start()

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the connection; whether it is up."""
        return await self.mqtt.wait_connected(timeout_s)

    async def close(self) -> None:
        await self.mqtt.close()

    async def check(self) -> object:
        """Readiness check: raises unless connected."""
        if not self.is_connected:
            raise PublishError("not connected to the MQTT broker")
        return True

    @property
    def is_connected(self) -> bool:
        return self.mqtt.is_connected

    async def publish(
        self, topic: str, payload: bytes, expiry_s: int | None = None, *, retain: bool = False
    ) -> None:
        """Publish at QoS 1 and wait for the PUBACK; :class:`PublishError` (or :class:`PublishRefused`)
        unless the broker accepted the message."""
        if not self.is_connected:
            COMMANDS_PUBLISHED.labels("not_connected").inc()
            raise PublishError("not connected to the MQTT broker", "not_connected")
        properties: dict[str, Any] = {"retain": True} if retain else {}
        if expiry_s is not None:
            # The broker drops the message instead of delivering it to a device that reconnects too late.
            properties["message_expiry_interval"] = expiry_s
        try:
            await self.mqtt.publish(topic, payload, self._timeout, **properties)
        except PublishRefused as exc:
            COMMANDS_PUBLISHED.labels("refused").inc()
            log.error("the MQTT broker refused a command", topic=topic, reason=str(exc))
            raise
        except PublishError as exc:
            COMMANDS_PUBLISHED.labels(exc.outcome).inc()
            raise
        COMMANDS_PUBLISHED.labels("acked").inc()
