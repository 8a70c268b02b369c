"""One client connection: its subscriptions, a bounded outgoing queue and the task that writes it.

The fan-out never awaits a client: it only calls :meth:`Connection.send`, which enqueues without waiting.
Each connection's own writer task drains its queue into the socket, so a slow client blocks nothing but
itself; when its queue overflows it is dropped with close code 4008.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Sequence
from typing import Final, NamedTuple

from aiohttp import WSMsgType, web
from aiohttp.http_websocket import WebSocketWriter

from iot_common.auth import Principal
from iot_common.logging import get_logger
from iot_realtime import metrics
from iot_realtime.backfill import Seam
from iot_realtime.protocol import CLOSE_TOO_SLOW

log = get_logger(__name__)


class EventFilter(NamedTuple):
    """What a subscription is limited to: these metrics (None: every metric) and these event types (None:
    every type)."""

    metrics: frozenset[str] | None = None
    types: frozenset[str] | None = None


MetricFilter = EventFilter | None
"""A subscription's filter; None means every event in full."""

_MAX_REASON_BYTES = 123  # RFC 6455: a close frame's payload is at most 125 bytes, 2 of them the code
_TEXT_FIN: Final = 0x81  # RFC 6455 5.2: FIN, opcode 1 (text), no RSV bits (no compression)
_HEADER_7: Final = struct.Struct("!BB").pack
_HEADER_16: Final = struct.Struct("!BBH").pack
_HEADER_64: Final = struct.Struct("!BBQ").pack


class TextFrames:
    """Writes a run of queued text frames to a server WebSocket in one transport write (one syscall)
    instead of one per frame.

    aiohttp writes each frame on its own and has no call for several; this builds the frames as its
    :class:`WebSocketWriter` does for a server (unmasked, uncompressed: this service's WebSockets never
    compress) and keeps its flow control (wait while the transport is paused). It relies on that writer's
    attributes, so :meth:`of` only returns one for the writer it knows; anything else (another aiohttp,
    a compressing socket) is written frame by frame with ``send_frame``.
    """

    def __init__(self, writer: WebSocketWriter) -> None:
        self._writer = writer

    @classmethod
    def of(cls, ws: web.WebSocketResponse) -> TextFrames | None:
        writer = getattr(ws, "_writer", None)
        if type(writer) is not WebSocketWriter or writer.use_mask or writer.compress:
            return None
        if not all(hasattr(writer, a) for a in ("_closing", "_output_size", "_limit", "protocol")):
            return None
        if not hasattr(writer.protocol, "_paused") or not hasattr(writer.protocol, "_drain_helper"):
            return None
        return cls(writer)

    async def write(self, frames: Sequence[bytes]) -> None:
        writer = self._writer
        transport = writer.transport
        if writer._closing or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        parts: list[bytes] = []
        for frame in frames:
            size = len(frame)
            if size < 126:
                parts.append(_HEADER_7(_TEXT_FIN, size))
            elif size < 65536:
                parts.append(_HEADER_16(_TEXT_FIN, 126, size))
            else:
                parts.append(_HEADER_64(_TEXT_FIN, 127, size))
            parts.append(frame)
        data = b"".join(parts)
        transport.write(data)
        # aiohttp's flow control, as in WebSocketWriter.send_frame: past its limit, wait while paused.
        writer._output_size += len(data)
        if writer._output_size > writer._limit:
            writer._output_size = 0
            protocol = writer.protocol
            if protocol._paused:
                await protocol._drain_helper()


class Connection:
    """An authenticated WebSocket client of this process."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.BaseTransport | None,
        principal: Principal,
        *,
        tenant_id: str,
        queue_size: int,
        close_timeout: float,
    ) -> None:
        self.ws = ws
        self._transport = transport
        self.principal = principal
        self.tenant_id = tenant_id
        """The tenant this connection acts in (its credential's, or the one a platform admin chose): it
        sees that tenant's devices only."""
        self.filters: dict[str, MetricFilter] = {}
        """Subscribed device ids (or ``*``) and the metrics and event types each is limited to."""
        self.dropped = False
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(queue_size)
        self._held: list[bytes] | None = None
        self.seam: Seam | None = None
        """The readings of the last backfill, whose live copies are dropped for a while."""
        self._close_timeout = close_timeout
        self._writer: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="ws-writer")

    def send(self, frame: bytes) -> None:
        """Queue ``frame`` for the writer without waiting; an overflow drops the client."""
        if self.dropped:
            metrics.DROPPED_MESSAGES.inc()
            return
        if self.seam is not None:
            if self.seam.expired:
                self.seam = None
            else:
                admitted = self.seam.admit(frame)
                if admitted is None:
                    metrics.BACKFILL_DUPLICATES.inc()
                    return
                frame = admitted
        if self._held is not None:
            # Held frames are bounded on their own: a backfill may fill the queue meanwhile.
            if len(self._held) >= self._queue.maxsize:
                self._overflow()
            else:
                self._held.append(frame)
            return
        try:
            self._queue.put_nowait(frame)
        except asyncio.QueueFull:
            self._overflow()

    def send_now(self, frame: bytes) -> None:
        """Queue a reply to the client ahead of held live events (snapshot, ack, error)."""
        held, self._held = self._held, None
        self.send(frame)
        self._held = held

    async def send_paced(self, frame: bytes) -> None:
        """Queue a reply ahead of held live events, waiting while the queue is full (a backfill larger
        than the queue); a client that reads nothing for the close timeout is dropped."""
        if self.dropped:
            return
        try:
            await asyncio.wait_for(self._queue.put(frame), self._close_timeout)
        except TimeoutError:
            self._overflow()

    def hold(self) -> None:
        """Keep live events back (still bounded) until :meth:`release`, so a snapshot goes first."""
        if self._held is None:
            self._held = []

    async def release_paced(self) -> None:
        """:meth:`release` for a queue a backfill may have filled: held frames go out in order as the
        client reads (later live events queue behind them), each checked against the seam."""
        held = self._held
        while held and not self.dropped:
            frame = held.pop(0)
            if self.seam is not None:
                admitted = self.seam.admit(frame)
                if admitted is None:
                    metrics.BACKFILL_DUPLICATES.inc()
                    continue
                frame = admitted
            await self.send_paced(frame)
        self._held = None

    def release(self) -> None:
        held, self._held = self._held, None
        for frame in held or ():
            self.send(frame)

    def close(self, code: int, reason: str) -> asyncio.Task[None]:
        """Stop writing and close the socket with ``code``; idempotent, returns the closing task."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close(code, reason), name="ws-close")
        return self._closing

    def _overflow(self) -> None:
        self.dropped = True
        metrics.DROPPED_CONNECTIONS.inc()
        metrics.DROPPED_MESSAGES.inc()
        log.warning("client too slow, dropping it", subject=self.principal.subject)
        self.close(CLOSE_TOO_SLOW, "outgoing queue overflow: client too slow")

    async def _write_loop(self) -> None:
        queue, ws = self._queue, self.ws
        batch = TextFrames.of(ws)
        try:
            while True:
                frame = await queue.get()
                if queue.empty():
                    await ws.send_frame(frame, WSMsgType.TEXT)
                    sent = 1
                elif batch is not None:
                    # Everything queued meanwhile goes out in one write (at most the queue's size).
                    frames = [frame]
                    while not queue.empty():
                        frames.append(queue.get_nowait())
                    await batch.write(frames)
                    sent = len(frames)
                else:
                    await ws.send_frame(frame, WSMsgType.TEXT)
                    sent = 1
                    while not queue.empty():
                        await ws.send_frame(queue.get_nowait(), WSMsgType.TEXT)
                        sent += 1
                metrics.MESSAGES_OUT.inc(sent)
        except (ConnectionError, RuntimeError) as exc:
            # The peer went away; the handler's read loop sees it too and cleans up.
            log.debug("writer stopped", error=str(exc))

    async def _close(self, code: int, reason: str) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._close_timeout
        message = reason.encode()[:_MAX_REASON_BYTES]
        with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
            await asyncio.wait_for(
                self.ws.close(code=code, message=message, drain=False), self._close_timeout
            )
        # The close frame sits behind whatever the client has not read yet: give it the close timeout to
        # get through, then cut off a peer that still does not read (it would hold the buffer forever).
        transport = self._transport
        if not isinstance(transport, asyncio.WriteTransport):
            return
        # asyncio has no "write buffer empty" event, so this rarely taken path polls.
        while transport.get_write_buffer_size() > 0 and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if transport.get_write_buffer_size() > 0:
            transport.abort()
