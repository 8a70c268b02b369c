"""The services' MQTT plumbing: where the broker is (an ``IOT_MQTT_URL``-style URL), a connection that
stays up (:class:`MqttConnection`), and QoS 1 publications that wait for the broker's PUBACK."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import gmqtt
import structlog
from gmqtt.mqtt.constants import MQTTv50
from gmqtt.storage import PersistentStorage
from prometheus_client import Gauge

from iot_common.resilience import Backoff, Stopped, retry

# Short and capped low: after a broker restart, ingest must be subscribed again before devices publish,
# because a broker may restore a persistent session without its shared subscriptions (Mosquitto 2.0 does):
# until ingest subscribes, what devices publish is acknowledged and routed to no one (docs/deploy.md). A
# retry every 2 s from a few service replicas costs a broker nothing.
RECONNECT_MIN_S: Final = 0.1
RECONNECT_MAX_S: Final = 2.0


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


NO_MATCHING_SUBSCRIBERS: Final = 0x10
"""PUBACK reason 0x10: accepted, nobody subscribed right now (a device offline): the message is sent."""

REASON_NAMES: Final[dict[int, str]] = {
    0x80: "unspecified error",
    0x83: "implementation specific error",
    0x87: "not authorized",
    0x8F: "topic filter invalid",
    0x90: "topic name invalid",
    0x91: "packet identifier in use",
    0x97: "quota exceeded",
    0x99: "payload format invalid",
    0x9E: "shared subscriptions not supported",
    0xA1: "subscription identifiers not supported",
    0xA2: "wildcard subscriptions not supported",
}
"""MQTT 5 reason codes of a refused PUBLISH (PUBACK) or SUBSCRIBE (SUBACK), as the spec names them."""


def reason_text(code: int) -> str:
    """``"not authorized (135)"``: the reason's name and its decimal code."""
    return f"{REASON_NAMES.get(code, 'refused')} ({code})"


class PublishError(RuntimeError):
    """The broker did not take the message; the text says why, ``outcome`` says it in one word
    (``error``, ``timeout``, ``connection_lost``, ``refused``, ``not_connected``)."""

    def __init__(self, message: str, outcome: str = "error") -> None:
        super().__init__(message)
        self.outcome = outcome


class PublishRefused(PublishError):
    """The broker answered the PUBLISH with a PUBACK reason code >= 0x80: it dropped the message."""

    def __init__(self, reason_code: int) -> None:
        super().__init__(f"broker refused: {reason_text(reason_code)}", "refused")
        self.reason_code = reason_code


class PubackTracker(PersistentStorage):  # type: ignore[misc]
    """gmqtt's in-flight store that also resolves a future per packet id with the PUBACK's reason code.

    gmqtt removes a QoS 1 message from this store on its PUBACK and clears the store when a connection
    ends without a session to resume (the waiters then get ``None``). gmqtt 0.8 does not read the MQTT 5
    PUBACK reason code; :meth:`attach` wraps its PUBACK handler to note the code (absent means 0, success)
    just before the message leaves the store.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_mid: int | None = None
        self._waiters: dict[int, asyncio.Future[int | None]] = {}
        self._reasons: dict[int, int] = {}

    def attach(self, client: gmqtt.Client) -> None:
        """Read the reason code of every PUBACK ``client`` receives (call before it connects)."""
        handler = client._package_handler
        original = handler._handle_puback_packet

        def on_puback(cmd: int, packet: bytes) -> None:
            if len(packet) >= 2:
                (mid,) = struct.unpack("!H", packet[:2])
                # MQTT 5 3.4.2.1: no reason code byte means 0x00 (success).
                self._reasons[mid] = packet[2] if len(packet) > 2 else 0
            original(cmd, packet)

        # gmqtt looks its handlers up by name on the handler object (and caches them on first use).
        handler._handle_puback_packet = on_puback

    def push_message(self, mid: int, raw_package: bytes) -> None:
        super().push_message(mid, raw_package)
        self.last_mid = mid

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        self._resolve(mid, self._reasons.pop(mid, 0))

    def clear(self) -> None:
        super().clear()
        self._reasons.clear()
        for mid in list(self._waiters):
            self._resolve(mid, None)

    def waiter(self, mid: int) -> asyncio.Future[int | None]:
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._waiters[mid] = future
        return future

    def forget(self, mid: int) -> None:
        self._waiters.pop(mid, None)

    def _resolve(self, mid: int, reason: int | None) -> None:
        future = self._waiters.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(reason)


async def publish_acked(
    client: gmqtt.Client,
    tracker: PubackTracker,
    topic: str,
    payload: bytes,
    timeout_s: float,
    **properties: Any,
) -> int:
    """Publish at QoS 1 and wait for the PUBACK; its reason code (0 or 0x10) when the broker took it.

    Raises :class:`PublishRefused` for a reason code >= 0x80 (e.g. 0x87 "not authorized": the ACLs
    refuse it and the broker drops it), :class:`PublishError` when no PUBACK comes within ``timeout_s``
    (the broker may still deliver it) or the connection ends without a session to resume.
    """
    try:
        client.publish(topic, payload, qos=1, **properties)
    except Exception as exc:
        raise PublishError(f"publish failed: {type(exc).__name__}: {exc}") from exc
    # publish() stored the packet synchronously; nothing ran since, so the last id stored is ours.
    mid = tracker.last_mid
    assert mid is not None
    acked = tracker.waiter(mid)
    try:
        reason = await asyncio.wait_for(acked, timeout_s)
    except TimeoutError:
        tracker.forget(mid)
        raise PublishError(f"no PUBACK from the MQTT broker within {timeout_s:g} s", "timeout") from None
    if reason is None:
        raise PublishError("connection to the MQTT broker lost before its PUBACK", "connection_lost")
    if reason >= 0x80:
        raise PublishRefused(reason)
    return reason


class _SingleConnectionClient(gmqtt.Client):  # type: ignore[misc]
    """A gmqtt client that never reconnects by itself: once its connection is lost, it stays down."""

    async def reconnect(self, delay: bool = False) -> None:
        return None


class MqttConnection:
    """One gmqtt client that stays connected to the broker of ``url``.

    :meth:`connect` (or :meth:`start`, in the background) retries the first connection with backoff
    (0.1 s doubling to 2 s); after that gmqtt reconnects by itself after every loss, waiting the same
    backoff, which starts again from 0.1 s once connected. :attr:`connected` is set while the connection
    is up; ``on_connect(client, session_present)`` runs on each new connection (to subscribe), and the
    ``gauge`` (if any) is 1 while connected. ``client_options`` go to :class:`gmqtt.Client`.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        log: structlog.stdlib.BoundLogger,
        gauge: Gauge | None = None,
        on_connect: Callable[[gmqtt.Client, bool], None] | None = None,
        connected_fields: Mapping[str, Any] | None = None,
        reconnect: bool = True,
        **client_options: Any,
    ) -> None:
        self.endpoint = MqttEndpoint.parse(url)
        self.tracker = PubackTracker()
        self.connected = asyncio.Event()
        self.quiet = False
        """Set when stopping: a lost connection is then not logged as a warning."""
        self._log = log
        self._gauge = gauge
        self._on_connect_hook = on_connect
        self._connected_fields = dict(connected_fields or {})
        self._reconnect = Backoff(RECONNECT_MIN_S, RECONNECT_MAX_S)
        self._task: asyncio.Task[bool] | None = None
        client_class = gmqtt.Client if reconnect else _SingleConnectionClient
        self.client = client_class(client_id, persistent_storage=self.tracker, **client_options)
        self.tracker.attach(self.client)
        self.endpoint.authenticate(self.client)
        self.client.set_config({"reconnect_retries": -1, "reconnect_delay": RECONNECT_MIN_S})
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect

    @property
    def is_connected(self) -> bool:
        return self.connected.is_set() and bool(self.client.is_connected)

    async def connect(self, stop: asyncio.Event | None = None) -> bool:
        """Connect, retrying with backoff until it works (True) or ``stop`` is set (False)."""

        def failed(exc: Exception, delay: float) -> None:
            self._log.warning("mqtt connect failed, retrying", error=str(exc), retry_in_s=delay)

        try:
            await retry(
                lambda: self.endpoint.connect(self.client),
                Backoff(RECONNECT_MIN_S, RECONNECT_MAX_S),
                on_retry=failed,
                stop=stop,
            )
        except Stopped:
            return False
        return True

    def start(self) -> None:
        """Connect in the background (:meth:`connect` until it works); start-up does not wait for it."""
        self._task = asyncio.create_task(self.connect())

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the connection; whether it is up."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), timeout_s)
        return self.is_connected

    async def publish(self, topic: str, payload: bytes, timeout_s: float, **properties: Any) -> int:
        """:func:`publish_acked` on this connection."""
        return await publish_acked(self.client, self.tracker, topic, payload, timeout_s, **properties)

    async def close(self, end_session: bool = False) -> None:
        """Stop connecting and disconnect. A persistent session stays with the broker, unless
        ``end_session``: the DISCONNECT then sets its expiry to 0 and the broker discards it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        properties = {"session_expiry_interval": 0} if end_session else {}
        with contextlib.suppress(Exception):
            await self.client.disconnect(**properties)
        self.connected.clear()
        if self._gauge is not None:
            self._gauge.set(0)

    def _on_connect(self, client: gmqtt.Client, flags: int, rc: int, properties: Any) -> None:
        self._reconnect.reset()
        client.reconnect_delay = RECONNECT_MIN_S
        if self._on_connect_hook is not None:
            self._on_connect_hook(client, bool(flags))
        self.connected.set()
        if self._gauge is not None:
            self._gauge.set(1)
        self._log.info("mqtt connected", session_present=bool(flags), **self._connected_fields)

    def _on_disconnect(self, client: gmqtt.Client, packet: Any, exc: Any = None) -> None:
        self.connected.clear()
        if self._gauge is not None:
            self._gauge.set(0)
        # gmqtt reconnects by itself after reconnect_delay; taking it from the backoff gives the backoff.
        client.reconnect_delay = self._reconnect.next()
        if not self.quiet:
            self._log.warning("mqtt disconnected, reconnecting", retry_in_s=client.reconnect_delay)
