"""The ``/ws`` handler's bookkeeping, over a real aiohttp server on 127.0.0.1 with the hub and database
faked: whatever fails once a connection is admitted, its credential's place is given back."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterable

import pytest
from aiohttp import WSServerHandshakeError, web
from aiohttp.test_utils import TestClient, TestServer

from iot_common.auth import issue_token, user_principal
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_realtime.connection import Connection
from iot_realtime.gateway import GATEWAY, Gateway, Refused, websocket_handler
from iot_realtime.settings import RealtimeSettings
from iot_testkit.tokens import user_token

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


class TenantsPool:
    """Answers the gateway's ``SELECT true FROM tenants WHERE id = $1`` from a set."""

    def __init__(self, *tenants: str) -> None:
        self.tenants = set(tenants)
        self.queries = 0

    async def fetchval(self, query: str, tenant_id: str) -> bool | None:
        self.queries += 1
        return True if tenant_id in self.tenants else None


OWN = "00000000-0000-0000-0000-000000000001"
OTHER = "7d3f0a9e-2b1c-4e5f-8a6b-9c0d1e2f3a4b"


async def test_a_connection_acts_in_its_credentials_tenant_unless_a_platform_admin_names_another() -> None:
    pool = TenantsPool(OWN, OTHER)
    gateway = Gateway(RealtimeSettings(jwt_secret=SECRET), FakeHub(), None, pool, None)  # type: ignore[arg-type]
    tenant_admin = await gateway.authenticate(user_token(SECRET, "ta", role="admin"))
    platform_admin = user_principal(uuid.uuid4(), DEFAULT_TENANT_ID, "admin", platform_admin=True)
    admin = await gateway.authenticate(issue_token(SECRET, platform_admin, 60))
    assert await gateway.tenant_for(tenant_admin, None) == OWN
    assert await gateway.tenant_for(tenant_admin, OWN.upper()) == OWN  # its own, in any spelling of the UUID
    assert await gateway.tenant_for(admin, None) == OWN  # a platform admin without a choice: the default
    assert await gateway.tenant_for(admin, OTHER) == OTHER
    refusals = []
    for principal, requested in (
        (tenant_admin, OTHER),
        (admin, "8e2c6b1a-0000-4000-8000-000000000000"),
        (admin, "acme"),
    ):
        with pytest.raises(Refused) as refused:
            await gateway.tenant_for(principal, requested)
        refusals.append((refused.value.code, refused.value.reason))
    assert refusals == [
        (4003, "only a platform admin may choose another tenant"),
        (4003, "no such tenant"),
        (4003, "tenant must be a tenant id (a UUID)"),
    ]
    assert pool.queries == 2  # only a platform admin's choice of another tenant is looked up
