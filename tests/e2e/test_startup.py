"""Start-up against backends that do not answer: one line naming the backend, its variable and host:port,
an exit status per backend, the wait of ``IOT_STARTUP_WAIT_S``, and the line each service logs once it
listens. Every "closed" port is a free port of 127.0.0.1 that nothing listens on."""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import pytest

from iot_testkit.processes import RedisServer, ServiceProcess, free_port, mosquitto

Start = Callable[[str, Mapping[str, str]], ServiceProcess]

PASSWORD = "s3cret-startup-pw"
BACKENDS = {
    "IOT_DATABASE_URL": ("PostgreSQL", 10),
    "IOT_REDIS_URL": ("Redis", 11),
    "IOT_MQTT_URL": ("MQTT broker", 12),
}
PORT_VARS = {
    "iot-api": "IOT_API_PORT",
    "iot-realtime": "IOT_REALTIME_PORT",
    "iot-ingest": "IOT_INGEST_HTTP_PORT",
}


def closed_url(variable: str, port: int) -> str:
    """A well-formed URL, with a password, to a port where nothing listens."""
    return {
        "IOT_DATABASE_URL": f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/iot",
        "IOT_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:{port}/0",
        "IOT_MQTT_URL": f"mqtt://ingest:{PASSWORD}@127.0.0.1:{port}",
    }[variable]


@pytest.fixture
def backends(database_url: str, redis_url: str, mqtt_url: str, unique: str) -> dict[str, str]:
    """Settings under which every backend answers (a private, migrated database)."""
    return {
        "IOT_DATABASE_URL": database_url,
        "IOT_REDIS_URL": redis_url,
        "IOT_MQTT_URL": mqtt_url,
        "IOT_MQTT_SHARE_GROUP": f"startup-{unique}",
        "IOT_MQTT_CLIENT_ID": f"startup-{unique}",
        "IOT_REDIS_PREFIX": f"startup-{unique}",
        **{port_var: str(free_port()) for port_var in PORT_VARS.values()},
    }


def events(proc: ServiceProcess) -> list[dict[str, Any]]:
    lines = proc.log_lines()
    assert all(line.startswith("{") for line in lines), "\n".join(lines)
    return [json.loads(line) for line in lines]


def assert_one_clean_error(proc: ServiceProcess) -> dict[str, Any]:
    """The log has no traceback, no password, and ends with the error line, which is returned."""
    text = "\n".join(proc.log_lines())
    assert "Traceback" not in text, text
    assert PASSWORD not in text, "the password of the URL must not be logged"
    last = events(proc)[-1]
    assert last["level"] == "error", text
    return last


@pytest.mark.parametrize(
    ("script", "variable"),
    [
        ("iot-api", "IOT_DATABASE_URL"),
        ("iot-realtime", "IOT_DATABASE_URL"),
        ("iot-realtime", "IOT_REDIS_URL"),
        ("iot-ingest", "IOT_DATABASE_URL"),
        ("iot-ingest", "IOT_REDIS_URL"),
        ("iot-ingest", "IOT_MQTT_URL"),
        ("iot-migrate", "IOT_DATABASE_URL"),
    ],
)
def test_a_backend_that_does_not_answer_stops_start_up_with_one_line_and_its_status(
    service: Start, backends: dict[str, str], script: str, variable: str
) -> None:
    closed = free_port()
    name, status = BACKENDS[variable]
    proc = service(script, {**backends, variable: closed_url(variable, closed)})
    assert proc.wait_exit() == status, proc.logs()
    error = assert_one_clean_error(proc)
    where = f"127.0.0.1:{closed}"
    assert error["event"].startswith(f"{name} does not answer at {where} ({variable}): ")
    assert (error["variable"], error["address"], error["exit_code"]) == (variable, where, status)
    # Besides the error, only the "starting" line (iot-migrate has none).
    assert len(proc.log_lines()) <= 2, proc.logs()


@pytest.mark.parametrize(
    ("script", "variable"),
    [("iot-api", "IOT_DATABASE_URL"), ("iot-realtime", "IOT_REDIS_URL"), ("iot-ingest", "IOT_MQTT_URL")],
)
def test_start_up_waits_logging_one_line_per_attempt_then_gives_up_with_the_same_line(
    service: Start, backends: dict[str, str], script: str, variable: str
) -> None:
    closed = free_port()
    name, status = BACKENDS[variable]
    env = {**backends, variable: closed_url(variable, closed), "IOT_STARTUP_WAIT_S": "2"}
    proc = service(script, env)
    assert proc.wait_exit() == status, proc.logs()
    error = assert_one_clean_error(proc)
    retries = [e for e in events(proc) if e["level"] == "warning"]
    assert retries, proc.logs()
    what = f"{name} does not answer at 127.0.0.1:{closed} ({variable})"
    for number, retry in enumerate(retries, start=1):
        assert retry["event"].startswith(f"{what}, retrying in ")
        assert retry["attempt"] == number
    assert error["event"].startswith(f"{what}: ")
    assert f"still after {len(retries) + 1} attempts" in error["event"]
    assert [e["event"] for e in events(proc)] == ["starting", *(r["event"] for r in retries), error["event"]]


def test_a_signal_while_waiting_stops_the_service_cleanly(service: Start, backends: dict[str, str]) -> None:
    closed = free_port()
    env = {**backends, "IOT_REDIS_URL": closed_url("IOT_REDIS_URL", closed), "IOT_STARTUP_WAIT_S": "600"}
    proc = service("iot-realtime", env)
    proc.wait_log("retrying in")
    assert proc.stop(signal.SIGTERM) == 0, proc.logs()
    assert events(proc)[-1]["event"] == "stopped"


def test_a_refused_login_is_not_waited_for(service: Start, backends: dict[str, str]) -> None:
    database = backends["IOT_DATABASE_URL"].rsplit("/", 1)[0] + "/no_such_database_for_startup"
    proc = service("iot-migrate", {**backends, "IOT_DATABASE_URL": database, "IOT_STARTUP_WAIT_S": "600"})
    assert proc.wait_exit() == 10, proc.logs()
    error = assert_one_clean_error(proc)
    assert "refused the connection" in error["event"]
    assert "no_such_database_for_startup" in error["event"]
    assert len(proc.log_lines()) == 1, proc.logs()


def assert_listening(proc: ServiceProcess, port: int) -> None:
    listening = [e for e in events(proc) if e["event"] == "listening"]
    assert [e["address"] for e in listening] == [f"0.0.0.0:{port}"], proc.logs()


def test_realtime_uses_a_redis_that_comes_up_while_it_waits(service: Start, backends: dict[str, str]) -> None:
    redis = RedisServer()  # its port is chosen, the server not started yet
    port = int(backends["IOT_REALTIME_PORT"])
    proc = service("iot-realtime", {**backends, "IOT_REDIS_URL": redis.url, "IOT_STARTUP_WAIT_S": "120"})
    try:
        proc.wait_log("Redis does not answer at")
        redis.start()
        proc.wait_log(f"Redis answers at 127.0.0.1:{redis.port} (IOT_REDIS_URL)")
        proc.wait_http(f"http://127.0.0.1:{port}/readyz")
        assert_listening(proc, port)
        assert proc.stop() == 0, proc.logs()
    finally:
        redis.stop()
    assert "Traceback" not in proc.logs()


def test_ingest_uses_a_broker_that_comes_up_while_it_waits(
    service: Start, backends: dict[str, str], database_url: str
) -> None:
    closed = free_port()
    port = int(backends["IOT_INGEST_HTTP_PORT"])
    env = {
        **backends,
        "IOT_DATABASE_URL": database_url,
        "IOT_MQTT_URL": f"mqtt://127.0.0.1:{closed}",
        "IOT_STARTUP_WAIT_S": "120",
    }
    proc = service("iot-ingest", env)
    proc.wait_log("MQTT broker does not answer at")
    with mosquitto(port=closed):
        proc.wait_log(f"MQTT broker answers at 127.0.0.1:{closed} (IOT_MQTT_URL)")
        proc.wait_http(f"http://127.0.0.1:{port}/readyz")
        assert_listening(proc, port)
        assert proc.stop() == 0, proc.logs()
    assert "Traceback" not in proc.logs()


def test_the_api_starts_without_redis_and_broker_naming_each_once(
    service: Start, backends: dict[str, str], database_url: str
) -> None:
    closed = free_port()
    port = int(backends["IOT_API_PORT"])
    env = {
        **backends,
        "IOT_DATABASE_URL": database_url,
        "IOT_REDIS_URL": closed_url("IOT_REDIS_URL", closed),
        "IOT_MQTT_URL": closed_url("IOT_MQTT_URL", closed),
        "IOT_API_COMMAND_PUBACK_TIMEOUT_S": "0.5",
        "IOT_STARTUP_WAIT_S": "600",  # not spent on backends the API can run without
    }
    proc = service("iot-api", env)
    proc.wait_http(f"http://127.0.0.1:{port}/readyz")
    assert_listening(proc, port)
    warnings = [e for e in events(proc) if e["logger"] == "iot-api" and e["level"] == "warning"]
    assert [(w["variable"], w["address"]) for w in warnings] == [
        ("IOT_REDIS_URL", f"127.0.0.1:{closed}"),
        ("IOT_MQTT_URL", f"127.0.0.1:{closed}"),
    ]
    assert all("starting without it" in w["event"] for w in warnings)
    body = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()
    assert body["checks"]["postgres"] == "ok"
    assert body["checks"]["redis"] != "ok"
    assert proc.stop() == 0, proc.logs()
    assert PASSWORD not in proc.logs()


@pytest.mark.parametrize("script", ["iot-api", "iot-realtime", "iot-ingest"])
def test_a_database_without_the_schema_stops_start_up_saying_to_run_migrate(
    service: Start, backends: dict[str, str], empty_database_url: str, script: str
) -> None:
    proc = service(script, {**backends, "IOT_DATABASE_URL": empty_database_url})
    assert proc.wait_exit() == 13, proc.logs()
    error = assert_one_clean_error(proc)
    assert error["event"].startswith("PostgreSQL at 127.0.0.1:"), error
    assert "(IOT_DATABASE_URL) is not ready for this release: the database has no schema" in error["event"]
    assert error["event"].endswith("run iot-migrate")
    assert len(proc.log_lines()) <= 2, proc.logs()


def test_a_schema_applied_while_the_service_waits_is_used(
    service: Start, backends: dict[str, str], empty_database_url: str
) -> None:
    port = int(backends["IOT_REALTIME_PORT"])
    env = {**backends, "IOT_DATABASE_URL": empty_database_url, "IOT_STARTUP_WAIT_S": "120"}
    proc = service("iot-realtime", env)
    proc.wait_log("PostgreSQL is not ready at")
    assert service("iot-migrate", env).wait_exit() == 0
    proc.wait_http(f"http://127.0.0.1:{port}/readyz")
    assert proc.stop() == 0, proc.logs()
    assert "Traceback" not in proc.logs()


@pytest.mark.parametrize("script", ["iot-realtime", "iot-ingest"])
def test_a_port_in_use_stops_start_up_with_one_line(
    service: Start, backends: dict[str, str], script: str
) -> None:
    port = int(backends[PORT_VARS[script]])
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", port))
        taken.listen()
        proc = service(script, backends)
        assert proc.wait_exit() == 14, proc.logs()
    error = assert_one_clean_error(proc)
    assert error["event"].startswith("cannot listen: "), error
    assert str(port) in error["event"]
