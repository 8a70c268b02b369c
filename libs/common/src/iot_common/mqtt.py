"""Where and how the services reach the MQTT broker, from an ``IOT_MQTT_URL``-style URL."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import gmqtt
from gmqtt.mqtt.constants import MQTTv50


@dataclass(frozen=True)
class MqttEndpoint:
    """``mqtt://[user:password@]host[:port]`` (``mqtts://`` for TLS); user and password percent-decoded."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> MqttEndpoint:
        parts = urlsplit(url)
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    def authenticate(self, client: gmqtt.Client) -> None:
        """Give ``client`` this endpoint's user and password, if it has any."""
        if self.username:
            client.set_auth_credentials(self.username, self.password)

    async def connect(self, client: gmqtt.Client, keepalive: int = 30) -> None:
        """Connect ``client`` over MQTT 5 (TLS with the system's trust store for ``mqtts``)."""
        context: ssl.SSLContext | bool = ssl.create_default_context() if self.tls else False
        await client.connect(self.host, self.port, ssl=context, keepalive=keepalive, version=MQTTv50)
