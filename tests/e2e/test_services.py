"""Each console script starts, answers its health endpoints, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Callable, Mapping

import asyncpg
import pytest

from iot_testkit.processes import BIN, ServiceProcess, free_port

Start = Callable[[str, Mapping[str, str]], ServiceProcess]


@pytest.mark.parametrize(
    ("script", "port_var"),
    [
        ("iot-api", "IOT_API_PORT"),
        ("iot-realtime", "IOT_REALTIME_PORT"),
        ("iot-ingest", "IOT_INGEST_HTTP_PORT"),
    ],
)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_service_serves_health_and_stops_on_signal(
    service: Start,
    database_url: str,
    redis_url: str,
    mqtt_url: str,
    script: str,
    port_var: str,
    sig: signal.Signals,
    unique: str,
) -> None:
    port = free_port()
    proc = service(
        script,
        {
            "IOT_DATABASE_URL": database_url,
            "IOT_REDIS_URL": redis_url,
            "IOT_MQTT_URL": mqtt_url,
            "IOT_REDIS_PREFIX": f"test-{unique}",
            "IOT_MQTT_SHARE_GROUP": f"test-{unique}",
            port_var: str(port),
        },
    )
    proc.wait_http(f"http://127.0.0.1:{port}/healthz")
    proc.wait_http(f"http://127.0.0.1:{port}/readyz")
    assert proc.stop(sig) == 0, proc.logs()
    assert '"event":"stopped"' in proc.logs()


def test_service_refuses_a_malformed_setting_naming_the_variable() -> None:
    result = subprocess.run(
        [str(BIN / "iot-ingest")],
        env={"IOT_REDIS_URL": "localhost:6379", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "IOT_REDIS_URL" in result.stderr


@pytest.mark.parametrize(
    ("script", "port_var"), [("iot-api", "IOT_API_PORT"), ("iot-realtime", "IOT_REALTIME_PORT")]
)
@pytest.mark.parametrize(
    "secret",
    [
        None,
        "",
        "too-short-0123456789",
        "dev-only-insecure-jwt-secret-change-me",
        "REPLACE_ME_WITH_AT_LEAST_32_RANDOM_CHARACTERS",
        "compose-dev-secret-change-me-0123456789",
        "ChangeMe-ChangeMe-ChangeMe-ChangeMe-0123",
    ],
    ids=["unset", "empty", "short", "old-default", "k8s-placeholder", "compose-default", "changeme"],
)
def test_web_services_refuse_to_start_without_a_strong_jwt_secret(
    script: str, port_var: str, secret: str | None
) -> None:
    closed = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        # Were the secret accepted, the service would fail later on this closed port, with another status.
        "IOT_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed}/postgres",
        "IOT_REDIS_URL": f"redis://127.0.0.1:{closed}/0",
        "IOT_MQTT_URL": f"mqtt://127.0.0.1:{closed}",
        port_var: str(free_port()),
    }
    if secret is not None:
        env["IOT_JWT_SECRET"] = secret
    result = subprocess.run(
        [str(BIN / script)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{script}: invalid configuration: IOT_JWT_SECRET ")
    if secret:
        assert secret not in lines[0], "the message must not echo the secret"


def test_iot_migrate_run_concurrently_and_again_leaves_one_schema(empty_database_url: str) -> None:
    env = {"IOT_DATABASE_URL": empty_database_url, "PATH": "/usr/bin:/bin", "IOT_LOG_FORMAT": "json"}
    procs = [subprocess.Popen([str(BIN / "iot-migrate")], env=env, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=60)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    again = subprocess.run([str(BIN / "iot-migrate")], env=env, capture_output=True, timeout=60, check=True)
    assert b'"applied":[]' in again.stderr

    async def inspect() -> tuple[int, int]:
        conn = await asyncpg.connect(empty_database_url)
        try:
            versions = await conn.fetchval("SELECT count(*) FROM schema_migrations")
            today = await conn.fetchval(
                "SELECT count(*) FROM pg_class WHERE relname = "
                "'telemetry_p' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')"
            )
            return versions, today
        finally:
            await conn.close()

    versions, today = asyncio.run(inspect())
    assert versions >= 1
    assert today == 1
