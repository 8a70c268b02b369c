"""What the start-up line says about a backend URL: host and port, never the user or password."""

from __future__ import annotations

import pytest

from iot_common.startup import MQTT, POSTGRES, REDIS, BackendUnavailable, address


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://iot:pw@db.internal:6432/iot", "db.internal:6432"),
        ("postgres://iot@db/iot", "db:5432"),
        ("postgresql://iot:pw@[fd00::5]:5432/iot", "[fd00::5]:5432"),
        ("postgresql:///iot?host=/var/run/postgresql", "/var/run/postgresql:5432"),
        ("postgresql://iot:pw@a:5432,b:5433/iot", "a:5432,b:5433"),
        ("redis://:pw@cache:6380/0", "cache:6380"),
        ("rediss://default:pw@cache/0", "cache:6379"),
        ("mqtt://ingest:pw@broker", "broker:1883"),
        ("mqtts://ingest:pw@broker", "broker:8883"),
    ],
)
def test_the_address_is_host_and_port_without_credentials(url: str, expected: str) -> None:
    assert address(url) == expected


def test_the_message_names_backend_variable_and_address_and_each_backend_has_its_own_status() -> None:
    error = BackendUnavailable(
        REDIS, "redis://:pw@cache:6380/0", "Connection refused", refused=False, attempts=3, waited_s=9.6
    )
    assert str(error) == (
        "Redis does not answer at cache:6380 (IOT_REDIS_URL): Connection refused"
        " (still after 3 attempts in 10 s)"
    )
    assert error.exit_code == 11
    assert len({POSTGRES.exit_code, REDIS.exit_code, MQTT.exit_code, 1, 2, 3}) == 6
