"""The simulator's broker user ``sim`` (it may publish for every device), added and removed on a running
Mosquitto with dynamic security by ``deploy/mosquitto/dynsec-sim.sh``, as Compose does around its ``sim``
profile.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from iot_testkit.processes import dynsec_mosquitto
from tests.integration.test_dynsec import connect

SCRIPT = Path(__file__).resolve().parents[2] / "deploy/mosquitto/dynsec-sim.sh"
REFUSED = r"(?i)not authori[sz]ed|bad user|refused|code"
ADMIN_PASSWORD = secrets.token_urlsafe(24)


@pytest.fixture
def dynsec_broker() -> Iterator[tuple[str, str]]:
    """A private broker with the dynamic-security plugin, its admin only: (admin URL, host:port)."""
    with dynsec_mosquitto(ADMIN_PASSWORD, prefix="iot-dynsec-sim-") as hostport:
        yield f"mqtt://admin:{ADMIN_PASSWORD}@{hostport}", hostport


def sim_user(hostport: str, action: str, **env: str) -> subprocess.CompletedProcess[str]:
    host, port = hostport.split(":")
    return subprocess.run(
        ["sh", str(SCRIPT), action],
        env={
            "PATH": os.environ["PATH"],
            "MQTT_HOST": host,
            "MQTT_PORT": port,
            "MQTT_ADMIN_PASSWORD": ADMIN_PASSWORD,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_sim_user_exists_only_between_add_and_remove(dynsec_broker: tuple[str, str]) -> None:
    hostport = dynsec_broker[1]
    first, second = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    nothing = sim_user(hostport, "remove")
    assert nothing.returncode == 0, nothing.stderr
    with pytest.raises(Exception, match=REFUSED):
        await connect(hostport, "sim", first)

    no_password = sim_user(hostport, "add")
    assert no_password.returncode != 0
    assert "IOT_MQTT_SIM_PASSWORD" in no_password.stderr
    added = sim_user(hostport, "add", MQTT_SIM_PASSWORD=first)
    assert added.returncode == 0, added.stderr
    client = await connect(hostport, "sim", first)
    await client.disconnect()

    # Adding again keeps one user and sets the password given now.
    again = sim_user(hostport, "add", MQTT_SIM_PASSWORD=second)
    assert again.returncode == 0, again.stderr
    with pytest.raises(Exception, match=REFUSED):
        await connect(hostport, "sim", first)
    client = await connect(hostport, "sim", second)
    await client.disconnect()

    removed = sim_user(hostport, "remove")
    assert removed.returncode == 0, removed.stderr
    with pytest.raises(Exception, match=REFUSED):
        await connect(hostport, "sim", second)


def test_the_sim_user_script_fails_when_the_broker_refuses_the_admin(dynsec_broker: tuple[str, str]) -> None:
    for action, env in (("remove", {}), ("add", {"MQTT_SIM_PASSWORD": secrets.token_urlsafe(24)})):
        result = sim_user(dynsec_broker[1], action, MQTT_ADMIN_PASSWORD="not-the-admin-password", **env)
        assert result.returncode != 0, result.stdout
        assert "Not authorized" in result.stderr


def test_the_sim_user_needs_a_password_of_16_characters(dynsec_broker: tuple[str, str]) -> None:
    result = sim_user(dynsec_broker[1], "add", MQTT_SIM_PASSWORD="short")
    assert result.returncode == 2
    assert "at least 16 characters" in result.stderr
