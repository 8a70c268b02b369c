"""Helpers for driving ``iot-realtime`` as a process with real WebSocket clients and real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin

from iot_common.auth import Principal, issue_token
from iot_common.messages import TelemetryEvent, encode_event
from iot_common.tenancy import DEFAULT_TENANT_ID, Role
from iot_common.topics import RedisNames
from iot_testkit.metrics import metric
from iot_testkit.processes import JWT_SECRET, ServiceProcess, Start, free_port
from iot_testkit.tokens import key_token, user_token
from iot_testkit.waiting import wait_for

SECRET = JWT_SECRET
DEFAULT = str(DEFAULT_TENANT_ID)
"""The default tenant's id, as channel names hold it: the tenant of tokens and devices made here."""
ALLOWED_ORIGIN = "https://dashboard.example"


@dataclass
class Realtime:
    proc: ServiceProcess
    port: int
    names: RedisNames
    """The Redis names of this service (a prefix of its own: the Redis server is shared by tests)."""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, token: str | None = None) -> str:
        query = f"?token={token}" if token is not None else ""
        return f"ws://127.0.0.1:{self.port}/ws{query}"

    def metric(self, name: str) -> float:
        """The value of one unlabelled sample on ``/metrics``."""
        return metric(self.base, name)

    async def wait_metric(self, name: str, value: float, timeout: float = 10.0) -> None:
        """Wait until ``name`` reads ``value`` (the service updates it after the client sees the effect)."""
        await wait_for(lambda: self.metric(name) == value, timeout, f"{name} to read {value}", interval=0.05)


def start_realtime(
    service: Start, database_url: str, redis_url: str, extra: Mapping[str, str] | None = None
) -> Realtime:
    port = free_port()
    env = {
        "IOT_REDIS_PREFIX": f"rt{uuid.uuid4().hex[:10]}",
        "IOT_DATABASE_URL": database_url,
        "IOT_REDIS_URL": redis_url,
        "IOT_REALTIME_PORT": str(port),
        "IOT_JWT_SECRET": JWT_SECRET,
        "IOT_CORS_ORIGINS": ALLOWED_ORIGIN,
        **(extra or {}),
    }
    proc = service("iot-realtime", env)
    proc.wait_http(f"http://127.0.0.1:{port}/readyz")
    return Realtime(proc, port, RedisNames(env["IOT_REDIS_PREFIX"]))


def token(
    scopes: set[str] | None = None, ttl_s: int = 300, token_type: str = "access", subject: str = "user-e2e"
) -> str:
    granted = set(scopes or {"read"})
    if not granted & {"read", "write", "admin"}:  # a credential that may read nothing: a key without scopes
        return key_token(SECRET, subject, ttl_s=ttl_s, token_type=token_type)  # type: ignore[arg-type]
    role: Role = "admin" if "admin" in granted else "viewer"
    return user_token(SECRET, subject, role=role, ttl_s=ttl_s, token_type=token_type)  # type: ignore[arg-type]


def token_without_read() -> str:
    """A valid token that grants nothing: an API key's without a scope (every user role reads)."""
    principal = Principal(subject="key:e2e", kind="api_key", scopes=frozenset(), tenant_id=DEFAULT_TENANT_ID)
    return issue_token(SECRET, principal, 300)


async def register(database_url: str, *device_ids: str) -> None:
    """Register devices: the service accepts subscriptions only to devices that exist."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO devices (id) SELECT unnest($1::text[])", list(device_ids))
    finally:
        await conn.close()


def open_ws(url: str, origin: str | None = None, **kwargs: Any) -> Any:
    return connect(url, origin=Origin(origin) if origin else None, open_timeout=10, **kwargs)


async def recv_json(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    frame = await asyncio.wait_for(ws.recv(), timeout)
    result: dict[str, Any] = json.loads(frame)
    return result


async def close_code(ws: ClientConnection, timeout: float = 10.0) -> tuple[int | None, str | None]:
    """Read until the server closes; the close code and reason it sent."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    rcvd = ws.protocol.close_rcvd
    return (rcvd.code, rcvd.reason) if rcvd else (None, None)


async def subscribe(
    ws: ClientConnection, frame_id: int, devices: list[str], **extra: Any
) -> list[dict[str, Any]]:
    """Subscribe and return the frames up to and including the ``ack`` (the latest-value snapshots)."""
    await ws.send(json.dumps({"type": "subscribe", "id": frame_id, "devices": devices, **extra}))
    frames = []
    while True:
        frame = await recv_json(ws)
        frames.append(frame)
        if frame["type"] in ("ack", "error"):
            return frames


async def assert_nothing_pending(ws: ClientConnection) -> None:
    """A ping's pong is the next frame: nothing was queued for this client before it."""
    await ws.send(json.dumps({"type": "ping", "id": "probe"}))
    assert await recv_json(ws) == {"type": "pong", "id": "probe"}


def telemetry(device_id: str, **metrics: float | str) -> bytes:
    return encode_event(TelemetryEvent(device_id=device_id, ts=datetime.now(UTC), metrics=metrics))
