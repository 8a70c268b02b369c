"""Helpers for driving ``iot-realtime`` as a process with real WebSocket clients and real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin

from iot_common.messages import TelemetryEvent, encode_event
from iot_common.tenancy import Role
from iot_common.topics import RedisNames
from tests.support.backends import port_open
from tests.support.processes import JWT_SECRET, ServiceProcess, free_port
from tests.support.tokens import key_token, user_token

SECRET = JWT_SECRET
ALLOWED_ORIGIN = "https://dashboard.example"

Start = Callable[[str, Mapping[str, str]], ServiceProcess]


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
        import httpx

        for line in httpx.get(f"{self.base}/metrics", timeout=5).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not on /metrics")

    async def wait_metric(self, name: str, value: float, timeout: float = 10.0) -> None:
        """Wait until ``name`` reads ``value`` (the service updates it after the client sees the effect)."""
        deadline = time.monotonic() + timeout
        while (current := self.metric(name)) != value:
            assert time.monotonic() < deadline, f"{name} is {current}, expected {value}"
            await asyncio.sleep(0.05)


def start_realtime(
    service: Start, database_url: str, redis_url: str, extra: Mapping[str, str] | None = None
) -> Realtime:
    port = free_port()
    env = {
        "IOT_REDIS_PREFIX": f"rt{uuid.uuid4().hex[:10]}",
        "IOT_DATABASE_URL": database_url,
        "IOT_REDIS_URL": redis_url,
        "IOT_REALTIME_PORT": str(port),
        "IOT_JWT_SECRET": SECRET,
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


_NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


class RedisServer:
    """A redis-server of this test alone, on a free port, without persistence; can be stopped and
    started again on the same port (to restart Redis under a running service)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self._proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", *_NO_PERSISTENCE],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)


@contextlib.contextmanager
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()
