"""The ``/ws`` handler's bookkeeping, over a real aiohttp server on 127.0.0.1 with the hub and database
faked: whatever fails once a connection is admitted, its credential's place is given back."""

from __future__ import annotations

import secrets
from collections.abc import Iterable

import pytest
from aiohttp import WSServerHandshakeError, web
from aiohttp.test_utils import TestClient, TestServer

from iot_realtime.connection import Connection
from iot_realtime.gateway import GATEWAY, Gateway, websocket_handler
from iot_realtime.settings import RealtimeSettings
from tests.support.tokens import user_token

SECRET = secrets.token_urlsafe(48)


class FakeHub:
    async def remove(self, conn: Connection, selectors: Iterable[str]) -> None:
        pass


async def test_a_connection_that_fails_to_start_gives_its_credentials_place_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = RealtimeSettings(jwt_secret=SECRET, realtime_max_connections_per_principal=1)
    gateway = Gateway(settings, FakeHub(), None, None, None)  # type: ignore[arg-type]
    app = web.Application()
    app[GATEWAY] = gateway
    app.add_routes([web.get("/ws", websocket_handler)])

    def broken_start(self: Connection) -> None:
        raise RuntimeError("writer could not start")

    token = user_token(SECRET, "alice", ttl_s=60)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        with monkeypatch.context() as patch:
            patch.setattr(Connection, "start", broken_start)
            try:
                async with client.ws_connect(f"/ws?token={token}") as ws:
                    await ws.receive()
            except WSServerHandshakeError:
                pass
        # Given back before the socket is closed, so already done when the client sees the close.
        assert (gateway.connections, gateway._connections_of) == (set(), {})
        async with client.ws_connect(f"/ws?token={token}") as ws:  # alice's only place is free again
            await ws.send_str('{"type":"ping","id":1}')
            assert await ws.receive_json() == {"type": "pong", "id": 1}
