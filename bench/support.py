"""Pieces shared by the API benchmarks (bench_api, bench_login, bench_history_rss, bench_mqtt_hooks): a named
benchmark database on the PostgreSQL server, ``iot-api`` as a process waited for until ready, and concurrent
load from a separate process. What the tests share too (free ports, a private redis-server, waiting,
percentiles, RSS) is in iot_testkit.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import tempfile
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from iot_common.db import connect
from iot_common.db.migrate import apply_migrations
from iot_testkit.backends import POSTGRES, configured_url, with_database
from iot_testkit.processes import ServiceProcess, free_port

T = TypeVar("T")


def server_url() -> str:
    """The PostgreSQL server the benchmarks create their databases on."""
    return configured_url(POSTGRES)


def database_url(name: str) -> str:
    return with_database(server_url(), name)


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


@dataclass
class Api:
    service: ServiceProcess
    base: str

    @property
    def pid(self) -> int:
        return self.service.pid


@contextlib.contextmanager
def api_process(env: Mapping[str, str], timeout: float = 30.0) -> Iterator[Api]:
    """``iot-api`` on a free port of 127.0.0.1 with ``env`` over this environment (JSON logs at level
    warning, no rollup job, the run's random JWT secret unless ``env`` says otherwise), waited for until
    ``/readyz`` answers 200."""
    port = free_port()
    full_env = {
        "IOT_API_ROLLUP_INTERVAL_S": "0",
        "IOT_LOG_LEVEL": "warning",
        **env,
        "IOT_API_PORT": str(port),
    }
    with tempfile.TemporaryDirectory() as tmp:
        service = ServiceProcess("iot-api", full_env, Path(tmp)).start()
        try:
            api = Api(service, f"http://127.0.0.1:{port}")
            service.wait_http(f"{api.base}/readyz", timeout)
            yield api
        finally:
            service.stop()


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]


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
