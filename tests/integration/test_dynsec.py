"""Device identities on a Mosquitto started with the dynamic security plugin."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import gmqtt
import pytest

from iot_api.dynsec import DynsecAdmin
from iot_common.topics import command_topic, telemetry_topic
from tests.support.processes import dynsec_mosquitto

ADMIN_PASSWORD = "admin-secret-for-tests"


@pytest.fixture
def dynsec_broker() -> Iterator[tuple[str, str]]:
    """A broker with the plugin and no anonymous access: (admin URL, host:port)."""
    with dynsec_mosquitto(ADMIN_PASSWORD) as hostport:
        yield f"mqtt://admin:{ADMIN_PASSWORD}@{hostport}", hostport


@pytest.fixture
async def admin(dynsec_broker: tuple[str, str]) -> AsyncIterator[DynsecAdmin]:
    client = DynsecAdmin(dynsec_broker[0])
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


async def connect(hostport: str, username: str | None, password: str | None) -> gmqtt.Client:
    host, port = hostport.split(":")
    client = gmqtt.Client(f"t-{username}-{uuid.uuid4().hex[:8]}")
    if username:
        client.set_auth_credentials(username, password)
    await client.connect(host, int(port))
    return client


async def test_a_provisioned_device_connects_and_a_wrong_secret_is_refused(
    admin: DynsecAdmin, dynsec_broker: tuple[str, str]
) -> None:
    await admin.provision_device("dev-1", "right-secret")
    client = await connect(dynsec_broker[1], "dev-1", "right-secret")
    await client.disconnect()
    with pytest.raises(Exception, match=r"(?i)not authori[sz]ed|bad user|refused|code"):
        await connect(dynsec_broker[1], "dev-1", "wrong-secret")
    with pytest.raises(Exception, match=r"(?i)not authori[sz]ed|bad user|refused|code"):
        await connect(dynsec_broker[1], None, None)


async def test_a_device_reaches_only_its_own_topics(
    admin: DynsecAdmin, dynsec_broker: tuple[str, str]
) -> None:
    await admin.provision_device("dev-a", "secret-a")
    await admin.provision_device("dev-b", "secret-b")
    # An observer with every right sees what the broker lets through.
    await admin.ensure_service_user(
        "observer",
        "observer-secret",
        [
            {"acltype": "subscribePattern", "topic": "devices/#", "allow": True},
            {"acltype": "publishClientReceive", "topic": "devices/#", "allow": True},
            {"acltype": "publishClientSend", "topic": "devices/#", "allow": True},
        ],
    )
    seen: asyncio.Queue[str] = asyncio.Queue()
    observer = await connect(dynsec_broker[1], "observer", "observer-secret")
    observer.on_message = lambda _c, topic, payload, _q, _p: seen.put_nowait(f"{topic}={payload.decode()}")
    observer.subscribe("devices/#", qos=1)
    device = await connect(dynsec_broker[1], "dev-a", "secret-a")
    got: asyncio.Queue[str] = asyncio.Queue()
    device.on_message = lambda _c, topic, payload, _q, _p: got.put_nowait(topic)
    device.subscribe(command_topic("dev-b"), qos=1)
    device.subscribe(command_topic("dev-a"), qos=1)
    await asyncio.sleep(0.3)
    device.publish(telemetry_topic("dev-b"), b"spoofed", qos=1)
    device.publish(telemetry_topic("dev-a"), b"mine", qos=1)
    observer.publish(command_topic("dev-b"), b"for-b", qos=1)
    observer.publish(command_topic("dev-a"), b"for-a", qos=1)
    messages = {await asyncio.wait_for(seen.get(), 5) for _ in range(3)}
    assert f"{telemetry_topic('dev-a')}=mine" in messages
    assert f"{telemetry_topic('dev-b')}=spoofed" not in messages
    assert await asyncio.wait_for(got.get(), 5) == command_topic("dev-a")
    await asyncio.sleep(0.5)
    assert got.empty(), "the device received another device's command"
    assert f"{telemetry_topic('dev-b')}=spoofed" not in {seen.get_nowait() for _ in range(seen.qsize())}
    await device.disconnect()
    await observer.disconnect()


async def test_a_disabled_device_is_cut_and_cannot_reconnect(
    admin: DynsecAdmin, dynsec_broker: tuple[str, str]
) -> None:
    await admin.provision_device("dev-r", "secret-r")
    client = await connect(dynsec_broker[1], "dev-r", "secret-r")
    dropped = asyncio.Event()
    client.on_disconnect = lambda *_: dropped.set()
    client.set_config({"reconnect_retries": 0})
    await admin.disable_device("dev-r")
    await asyncio.wait_for(dropped.wait(), 5)
    with pytest.raises(Exception, match=r"(?i)not authori[sz]ed|bad user|refused|code"):
        await connect(dynsec_broker[1], "dev-r", "secret-r")
    await admin.provision_device("dev-r", "new-secret")
    again = await connect(dynsec_broker[1], "dev-r", "new-secret")
    await again.disconnect()
