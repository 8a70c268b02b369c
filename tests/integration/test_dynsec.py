"""Device identities on a Mosquitto started with the dynamic security plugin."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import gmqtt
import pytest

from iot_api.dynsec import DynsecAdmin, device_acls
from iot_common.topics import command_topic, state_desired_topic, state_reported_topic, telemetry_topic
from iot_testkit.processes import dynsec_mosquitto

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


async def subscribed(client: gmqtt.Client, topic: str) -> tuple[int, ...]:
    """Subscribe at QoS 1 and await the SUBACK: its reason codes (the QoS granted, or >= 0x80 refused)."""
    suback: asyncio.Future[tuple[int, ...]] = asyncio.get_running_loop().create_future()
    client.on_subscribe = lambda _c, _mid, codes, _p: suback.done() or suback.set_result(tuple(codes))
    client.subscribe(topic, qos=1)
    return await asyncio.wait_for(suback, 5)


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
    assert await subscribed(observer, "devices/#") == (1,)
    device = await connect(dynsec_broker[1], "dev-a", "secret-a")
    got: asyncio.Queue[str] = asyncio.Queue()
    device.on_message = lambda _c, topic, payload, _q, _p: got.put_nowait(f"{topic}={payload.decode()}")
    (refused,) = await subscribed(device, command_topic("dev-b"))
    assert refused >= 0x80, "the broker let a device subscribe to another device's commands"
    assert await subscribed(device, command_topic("dev-a")) == (1,)
    device.publish(telemetry_topic("dev-b"), b"spoofed", qos=1)
    device.publish(telemetry_topic("dev-a"), b"mine", qos=1)
    observer.publish(command_topic("dev-b"), b"for-b", qos=1)
    observer.publish(command_topic("dev-a"), b"for-a", qos=1)
    # A broker delivers one sender's messages in order: had it let "spoofed" through, the observer would
    # see it before "mine"; had it sent "for-b" to the device, the device would get it before "for-a".
    expected = {f"{telemetry_topic('dev-a')}=mine", f"{command_topic('dev-b')}=for-b"}
    expected.add(f"{command_topic('dev-a')}=for-a")
    observed: set[str] = set()
    while not expected <= observed:
        observed.add(await asyncio.wait_for(seen.get(), 5))
    assert observed == expected
    assert await asyncio.wait_for(got.get(), 5) == f"{command_topic('dev-a')}=for-a"
    observer.publish(command_topic("dev-a"), b"last", qos=1)
    assert await asyncio.wait_for(got.get(), 5) == f"{command_topic('dev-a')}=last"
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


async def test_a_device_reads_only_its_own_desired_state_and_reports_only_its_own(
    admin: DynsecAdmin, dynsec_broker: tuple[str, str]
) -> None:
    # dev-s's role as an older version created it (no state ACLs): provisioning again adds them.
    await admin.run(
        {
            "command": "createRole",
            "rolename": "device-dev-s",
            "acls": [a for a in device_acls("dev-s") if "/state/" not in a["topic"]],
        }
    )
    await admin.provision_device("dev-s", "secret-s")
    await admin.provision_device("dev-t", "secret-t")
    await admin.ensure_service_user(
        "observer2",
        "observer-secret",
        [
            {"acltype": "subscribePattern", "topic": "devices/#", "allow": True},
            {"acltype": "publishClientReceive", "topic": "devices/#", "allow": True},
            {"acltype": "publishClientSend", "topic": "devices/#", "allow": True},
        ],
    )
    seen: asyncio.Queue[str] = asyncio.Queue()
    observer = await connect(dynsec_broker[1], "observer2", "observer-secret")
    observer.on_message = lambda _c, topic, payload, _q, _p: seen.put_nowait(f"{topic}={payload.decode()}")
    assert await subscribed(observer, "devices/state/+/reported") == (1,)
    device = await connect(dynsec_broker[1], "dev-s", "secret-s")
    got: asyncio.Queue[str] = asyncio.Queue()
    device.on_message = lambda _c, topic, payload, _q, _p: got.put_nowait(f"{topic}={payload.decode()}")
    (refused,) = await subscribed(device, state_desired_topic("dev-t"))
    assert refused >= 0x80, "the broker let a device subscribe to another device's desired state"
    (wildcard,) = await subscribed(device, "devices/state/+/desired")
    assert wildcard >= 0x80
    assert await subscribed(device, state_desired_topic("dev-s")) == (1,)
    device.publish(state_reported_topic("dev-t"), b"spoofed", qos=1)
    device.publish(state_reported_topic("dev-s"), b"mine", qos=1)
    observer.publish(state_desired_topic("dev-t"), b"for-t", qos=1)
    observer.publish(state_desired_topic("dev-s"), b"for-s", qos=1)
    # In order per sender: "spoofed" would arrive before "mine", "for-t" before "for-s".
    assert await asyncio.wait_for(seen.get(), 5) == f"{state_reported_topic('dev-s')}=mine"
    assert await asyncio.wait_for(got.get(), 5) == f"{state_desired_topic('dev-s')}=for-s"
    await device.disconnect()
    await observer.disconnect()
