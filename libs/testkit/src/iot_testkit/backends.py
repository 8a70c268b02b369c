"""Locating PostgreSQL, Redis and Mosquitto for the tests.

For each service, in order: the ``IOT_TEST_*_URL`` variable when set; a testcontainers container when a
Docker engine answers; the service on its usual local port when it answers there (a machine with the
services installed, as in CI); otherwise the test is skipped with the reason, or fails when ``CI`` is set.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

MOSQUITTO_TEST_CONFIG = """\
listener 1883
allow_anonymous true
persistence false
# Mosquitto drops QoS 1 messages for a persistent session beyond max_queued_messages (default 1000):
# a slow or restarting subscriber must not lose readings, so the limit is raised far above any test's
# volume. Not 0 ("no limit"): Mosquitto 2.0.11 then drops a client after a denied QoS 1 publish.
max_queued_messages 1000000
max_inflight_messages 0
"""


@dataclass(frozen=True)
class Backend:
    name: str
    env_var: str
    local_url: str
    image: str


POSTGRES = Backend(
    "PostgreSQL", "IOT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres", "postgres:16"
)
REDIS = Backend("Redis", "IOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0", "redis:7")
MQTT = Backend("Mosquitto", "IOT_TEST_MQTT_URL", "mqtt://127.0.0.1:1883", "eclipse-mosquitto:2")


def configured_url(backend: Backend) -> str:
    """``backend``'s ``IOT_TEST_*_URL``, else its usual local URL: what the benchmarks use (no containers,
    no skipping)."""
    return os.environ.get(backend.env_var) or backend.local_url


def with_database(url: str, database: str) -> str:
    """``url`` (a PostgreSQL server) pointing at the database ``database``."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def url_answers(url: str) -> bool:
    parts = urlsplit(url)
    default = {"postgresql": 5432, "postgres": 5432, "redis": 6379, "mqtt": 1883}.get(parts.scheme, 0)
    return port_open(parts.hostname or "127.0.0.1", parts.port or default)


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


@contextlib.contextmanager
def _postgres_container() -> Iterator[str]:
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer(POSTGRES.image, username="postgres", password="postgres") as pg:
        host, port = pg.get_container_host_ip(), pg.get_exposed_port(5432)
        yield f"postgresql://postgres:postgres@{host}:{port}/postgres"


@contextlib.contextmanager
def _redis_container() -> Iterator[str]:
    from testcontainers.redis import RedisContainer

    with RedisContainer(REDIS.image) as r:
        yield f"redis://{r.get_container_host_ip()}:{r.get_exposed_port(6379)}/0"


@contextlib.contextmanager
def _mosquitto_container() -> Iterator[str]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp, "mosquitto.conf")
        config.write_text(MOSQUITTO_TEST_CONFIG)
        container = (
            DockerContainer(MQTT.image)
            .with_exposed_ports(1883)
            .with_volume_mapping(str(config), "/mosquitto/config/mosquitto.conf")
        )
        with container as c:
            wait_for_logs(c, "running", timeout=30)
            yield f"mqtt://{c.get_container_host_ip()}:{c.get_exposed_port(1883)}"


_CONTAINERS: dict[str, Callable[[], contextlib.AbstractContextManager[str]]] = {
    POSTGRES.env_var: _postgres_container,
    REDIS.env_var: _redis_container,
    MQTT.env_var: _mosquitto_container,
}


@contextlib.contextmanager
def backend_url(backend: Backend) -> Iterator[str]:
    """The URL of ``backend`` for this test session (see the module docstring for the order)."""
    url = os.environ.get(backend.env_var)
    if url:
        if not url_answers(url):
            unavailable(f"{backend.name} at {backend.env_var}={url} does not answer")
        yield url
        return
    if docker_answers():
        with _CONTAINERS[backend.env_var]() as container_url:
            yield container_url
        return
    if url_answers(backend.local_url):
        yield backend.local_url
        return
    unavailable(
        f"{backend.name} unavailable: set {backend.env_var}, start a Docker engine for testcontainers, "
        f"or run {backend.name} at {backend.local_url}"
    )
