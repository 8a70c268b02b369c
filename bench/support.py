"""Pieces shared by the API benchmarks (bench_api, bench_login, bench_history_rss, bench_mqtt_hooks) and
bench_realtime_attack: the PostgreSQL server and a named benchmark database on it, free ports, a private
redis-server, ``iot-api`` as a process waited for until ready, concurrent load from a separate process, and
a process's RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from iot_common.db import connect
from iot_common.db.migrate import apply_migrations

BIN = Path(sys.executable).parent
T = TypeVar("T")


def server_url() -> str:
    """The PostgreSQL server the benchmarks create their databases on."""
    return os.environ.get("IOT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def database_url(name: str) -> str:
    return urlunsplit(urlsplit(server_url())._replace(path=f"/{name}"))


async def migrated_database(name: str, *, fresh: bool) -> str:
    """Create the database ``name`` (dropped first when ``fresh``, else kept when it exists), apply the
    migrations; its URL."""
    admin = await asyncpg.connect(server_url())
    try:
        if fresh:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if fresh or not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = database_url(name)
    conn = await connect(url)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    return url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server without persistence on a free port; yields its URL."""
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass
class Api:
    proc: subprocess.Popen[bytes]
    base: str

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.contextmanager
def api_process(env: Mapping[str, str], timeout: float = 30.0) -> Iterator[Api]:
    """``iot-api`` on a free port of 127.0.0.1 with ``env`` over this environment (JSON logs at level
    warning, no rollup job, a random JWT secret unless ``env`` says otherwise), waited for until ``/readyz``
    answers 200."""
    port = free_port()
    full_env = {
        **os.environ,
        "IOT_JWT_SECRET": secrets.token_urlsafe(48),
        "IOT_API_ROLLUP_INTERVAL_S": "0",
        "IOT_LOG_FORMAT": "json",
        "IOT_LOG_LEVEL": "warning",
        **env,
        "IOT_API_PORT": str(port),
    }
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "api.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [str(BIN / "iot-api")], env=full_env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            api = Api(proc, f"http://127.0.0.1:{port}")
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if httpx.get(f"{api.base}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("iot-api did not start:\n" + log_path.read_text()[-4000:])
                time.sleep(0.1)
            yield api
        finally:
            proc.terminate()
            proc.wait(20)


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (``VmRSS``), or its peak so far (``field="VmHWM"``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _run_coroutine(
    queue: Any, function: Callable[..., Coroutine[Any, Any, Any]], args: tuple[Any, ...]
) -> None:
    queue.put(asyncio.run(function(*args)))


def in_process(function: Callable[..., Coroutine[Any, Any, T]], *args: Any, timeout: float = 300.0) -> T:
    """``asyncio.run(function(*args))`` in a separate (spawned) process, so a load generator does not share
    an event loop or a core's GIL with anything; its result, within ``timeout`` seconds."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_coroutine, args=(queue, function, args))
    proc.start()
    result: T = queue.get(timeout=timeout)
    proc.join(30)
    return result
