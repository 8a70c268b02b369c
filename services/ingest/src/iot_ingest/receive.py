"""gmqtt's receive path for ingest: no task per message, one socket write for the PUBACKs of a batch.

gmqtt hands each PUBLISH to an ``async`` on_message handler as a task of its own, and writes each PUBACK
from that task's done-callback, one socket write per message: at 10,000 msg/s that is a quarter of
ingest's CPU (profile in docs/performance.md). Ingest has nothing to await per message (a message waits
only for its batch's commit), so :func:`install` replaces the client's PUBLISH handler with a plain
function: the packet is parsed, handed to ``receive`` synchronously, and ``receive`` acknowledges it later
through :class:`Acks`, which writes every PUBACK queued during one turn of the event loop in one write
(a batch's messages are acknowledged together, so their PUBACKs leave in one segment).

A PUBACK goes out only on the connection the message came on: after a reconnect the broker redelivers what
was not acknowledged, with the same packet identifiers, and a late PUBACK on the new connection could
acknowledge that copy before it is stored.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any, Final, Protocol

from gmqtt import Client
from gmqtt.mqtt.constants import MQTTCommands, MQTTv50

_PUBACK: Final = struct.Struct("!BBH")
"""PUBACK with remaining length 2: the packet identifier alone. In MQTT 5 the reason code and properties
may be left out when the reason is 0 (success) and there are no properties [MQTT-3.4.2.1]."""
_PUBACK_HEADER: Final = int(MQTTCommands.PUBACK)


class Link(Protocol):
    """What of gmqtt's ``MQTTConnection`` is used here: one network connection to the broker."""

    def send_package(self, package: bytes) -> None: ...

    def is_closing(self) -> bool: ...


Receive = Callable[[Link | None, int | None, str, bytes, bool, bool], None]
"""``receive(link, packet_id, topic, payload, dup, retain)``: one PUBLISH; ``packet_id`` None for QoS 0."""


class Acks:
    """PUBACKs queued during one turn of the event loop, written at its end, one write per connection."""

    def __init__(self, current: Callable[[], Link | None]) -> None:
        self._current = current
        self._pending: list[tuple[Link, int]] = []
        self._scheduled = False
        self.written = 0
        """PUBACKs written (for tests and metrics)."""

    def ack(self, link: Link, packet_id: int) -> None:
        """Acknowledge ``packet_id`` on ``link`` (the connection the message came on)."""
        self._pending.append((link, packet_id))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write what is queued now; PUBACKs for a connection that is gone or closing are dropped."""
        self._scheduled = False
        pending, self._pending = self._pending, []
        if not pending:
            return
        current = self._current()
        if current is None or current.is_closing():
            return
        # Only the current connection's PUBACKs go out (an old connection's are queued beside them only
        # around a reconnect), in the order they were queued.
        mids = [mid for link, mid in pending if link is current]
        if mids:
            current.send_package(b"".join([_PUBACK.pack(_PUBACK_HEADER, 2, mid) for mid in mids]))
            self.written += len(mids)


def install(client: Client, receive: Receive) -> Acks:
    """Make ``client`` hand every PUBLISH of QoS 0 or 1 to ``receive`` without a task, and return the
    :class:`Acks` that acknowledges them. Other packets (and a PUBLISH with properties gmqtt must see,
    such as a topic alias) keep gmqtt's own handling, which ends in ``client.on_message``."""
    handler: Any = client._package_handler
    original = handler._handle_publish_packet
    state = handler._connection_state

    def current() -> Link | None:
        link: Link | None = handler._connection
        return link

    def on_publish(cmd: int, raw: bytes) -> None:
        qos = (cmd >> 1) & 3
        if qos > 1 or len(raw) < 2:
            original(cmd, raw)
            return
        topic_end = 2 + int.from_bytes(raw[:2], "big")
        at = topic_end
        packet_id: int | None = None
        if qos == 1:
            packet_id = int.from_bytes(raw[at : at + 2], "big")
            at += 2
        if state.protocol_version >= MQTTv50:
            if at >= len(raw) or raw[at] != 0:
                # Properties (or a truncated packet): gmqtt parses them (topic aliases, limits) and then
                # calls the QoS handler below or on_message.
                original(cmd, raw)
                return
            at += 1
        if at > len(raw) or topic_end == 2:
            original(cmd, raw)  # an empty topic (alias) or a truncated packet: gmqtt's checks and logs
            return
        topic = raw[2:topic_end].decode("utf-8", errors="replace")
        receive(handler._connection, packet_id, topic, raw[at:], bool(cmd & 0x08), bool(cmd & 0x01))

    def on_qos_1(mid: int, payload: bytes, topic: str, properties: dict[str, Any]) -> None:
        # Reached from gmqtt's own PUBLISH parsing (a packet with properties).
        dup = bool(properties.get("dup"))
        retain = bool(properties.get("retain"))
        receive(handler._connection, mid, topic, payload, dup, retain)

    def on_message(
        _client: Client, topic: str, payload: bytes, _qos: int, properties: dict[str, Any]
    ) -> None:
        # QoS 0 with properties, from gmqtt's own parsing: nothing to acknowledge.
        receive(
            handler._connection,
            None,
            topic,
            payload,
            bool(properties.get("dup")),
            bool(properties.get("retain")),
        )

    handler._handle_publish_packet = on_publish
    handler._handle_qos_1_publish_packet = on_qos_1
    client.on_message = on_message
    handler._handler_cache.pop(int(MQTTCommands.PUBLISH), None)
    return Acks(current)
