"""A connection's writer on a real aiohttp WebSocket (127.0.0.1): frames queued while it writes go out
together in one transport write, each intact and in order whatever its length, and a client that reads
again after a pause gets everything."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from iot_common.auth import Principal
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_realtime.connection import Connection, TextFrames

WAIT_S = 10.0
PRINCIPAL = Principal(
    subject="alice",
    kind="user",
    scopes=frozenset({"read"}),
    tenant_id=DEFAULT_TENANT_ID,
    role="viewer",
    permissions=frozenset({"read"}),
)


def frames_of(sizes: list[int]) -> list[bytes]:
    """Text frames of these lengths, each telling its index (the header takes 7, 16 or 64 bits by size)."""
    out = []
    for i, size in enumerate(sizes):
        head = f'{{"i":{i},"pad":"'.encode()
        out.append(head + b"x" * max(size - len(head) - 2, 0) + b'"}')
    return out


async def serve(frames: list[bytes], writes: list[int]) -> TestClient[web.Request, web.Application]:
    """A server whose one WebSocket queues ``frames`` at once for its connection's writer; ``writes``
    gets the size of each transport write."""

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        assert TextFrames.of(ws) is not None  # the aiohttp of uv.lock: the batched path is taken
        transport: Any = request.transport
        write = transport.write

        def counted(data: bytes) -> None:
            writes.append(len(data))
            write(data)

        transport.write = counted
        conn = Connection(ws, transport, PRINCIPAL, tenant_id="t", queue_size=len(frames), close_timeout=1)
        for frame in frames:  # all queued before the writer first runs
            conn.send(frame)
        conn.start()
        await ws.receive()  # until the client closes
        await conn.close(1000, "done")
        return ws

    app = web.Application()
    app.add_routes([web.get("/ws", handler)])
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


async def test_queued_frames_of_every_length_go_out_intact_in_one_write() -> None:
    frames = frames_of([2, 10, 125, 126, 127, 200, 65535, 65536, 70_000, 30] * 3)
    writes: list[int] = []
    client = await serve(frames, writes)
    try:
        async with client.ws_connect("/ws", max_msg_size=0) as ws:
            received = []
            for _ in frames:
                msg = await asyncio.wait_for(ws.receive(), WAIT_S)
                assert msg.type is WSMsgType.TEXT
                received.append(msg.data.encode())
            assert received == frames
            # The writer found them all queued: one write (aiohttp's send_frame would have made 30).
            assert len(writes) == 1
    finally:
        await client.close()
