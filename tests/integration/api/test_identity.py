"""MQTT credentials through the API and the EMQX hooks, with the requests EMQX 5 sends.

The broker side (Mosquitto's dynamic security) is covered end to end in tests/e2e/test_device_identity.py;
here the API runs without a broker (credentials for EMQX only) or with one that does not answer.
"""

from __future__ import annotations

import hashlib
from typing import Any

import asyncpg
from litestar.testing import AsyncTestClient

from iot_testkit.processes import free_port
from tests.integration.api.conftest import ClientFactory

Client = AsyncTestClient[Any]
HOOK_SECRET = "hook-secret-for-tests-0123456789"
INGEST_PASSWORD = "ingest-password-0123456789"
HOOK = {"X-Hook-Secret": HOOK_SECRET}


async def hooks_client(make_client: ClientFactory, **overrides: Any) -> Client:
    client: Client = await make_client(
        mqtt_hook_secret=HOOK_SECRET,
        mqtt_service_users=[f"ingest:ingest:{INGEST_PASSWORD}", "api-1:api:api-password-0123456789"],
        **overrides,
    )
    return client


async def create(client: Client, headers: dict[str, str], device_id: str) -> dict[str, Any]:
    response = await client.post("/api/v1/devices", json={"id": device_id}, headers=headers)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def authn(client: Client, username: str | None, password: str | None, **extra: Any) -> Any:
    # The body EMQX sends with the documented authenticator config (see docs/device-identity.md).
    body = {"username": username, "password": password, "clientid": f"c-{username}", **extra}
    response = await client.post("/api/v1/mqtt/authn", json=body, headers=HOOK)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


async def authz(client: Client, username: str, action: str, topic: str) -> str:
    body = {"username": username, "clientid": f"c-{username}", "action": action, "topic": topic}
    response = await client.post("/api/v1/mqtt/authz", json=body, headers=HOOK)
    assert response.status_code == 200, response.text
    result: str = response.json()["result"]
    return result


async def test_a_new_device_gets_credentials_once_and_emqx_accepts_only_them(
    make_client: ClientFactory, writer: dict[str, str], unique: str
) -> None:
    client = await hooks_client(make_client)
    device = await create(client, writer, f"d-{unique}")
    mqtt = device["mqtt"]
    assert mqtt["username"] == f"d-{unique}"
    assert len(mqtt["password"]) >= 40
    assert "mqtt" not in (await client.get(f"/api/v1/devices/d-{unique}", headers=writer)).json()

    assert await authn(client, mqtt["username"], mqtt["password"]) == {
        "result": "allow",
        "is_superuser": False,
    }
    assert (await authn(client, mqtt["username"], mqtt["password"] + "x"))["result"] == "deny"
    assert (await authn(client, mqtt["username"], None))["result"] == "deny"
    # Unknown to us: EMQX may ask its next authenticator (or refuse when there is none).
    assert (await authn(client, f"nobody-{unique}", "whatever"))["result"] == "ignore"
    assert (await authn(client, None, None))["result"] == "ignore"
    # EMQX sends more fields than we read; they are ignored.
    assert (await authn(client, mqtt["username"], mqtt["password"], peerhost="10.0.0.7"))["result"] == "allow"

    status = (await client.get(f"/api/v1/devices/d-{unique}/credentials", headers=writer)).json()
    assert status["active"] is True
    assert status["username"] == f"d-{unique}"
    assert "password" not in status


async def test_rotation_replaces_the_secret_and_revocation_refuses_it(
    make_client: ClientFactory,
    writer: dict[str, str],
    reader: dict[str, str],
    unique: str,
    db: asyncpg.Connection[Any],
) -> None:
    client = await hooks_client(make_client)
    device_id = f"r-{unique}"
    old = (await create(client, writer, device_id))["mqtt"]["password"]
    assert (await client.post(f"/api/v1/devices/{device_id}/credentials", headers=reader)).status_code == 403
    rotated = await client.post(f"/api/v1/devices/{device_id}/credentials", headers=writer)
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()["password"]
    assert new != old
    # The cache entry of the old secret was dropped: the old one is refused at once.
    assert (await authn(client, device_id, old))["result"] == "deny"
    assert (await authn(client, device_id, new))["result"] == "allow"
    # Only a hash is stored.
    stored = await db.fetchval("SELECT secret_hash FROM device_credentials WHERE device_id = $1", device_id)
    assert stored == hashlib.sha256(new.encode()).hexdigest()

    assert await authz(client, device_id, "publish", f"devices/telemetry/{device_id}") == "allow"
    revoked = await client.delete(f"/api/v1/devices/{device_id}/credentials", headers=writer)
    assert revoked.status_code == 204
    assert (await authn(client, device_id, new))["result"] == "deny"
    assert await authz(client, device_id, "publish", f"devices/telemetry/{device_id}") == "deny"
    assert (await client.get(f"/api/v1/devices/{device_id}/credentials", headers=writer)).json()[
        "active"
    ] is False
    # Rotating again re-activates the device with a fresh secret.
    again = (await client.post(f"/api/v1/devices/{device_id}/credentials", headers=writer)).json()
    assert (await authn(client, device_id, again["password"]))["result"] == "allow"

    deleted = await client.delete(f"/api/v1/devices/{device_id}", headers=writer)
    assert deleted.status_code == 204
    assert (await authn(client, device_id, again["password"]))["result"] == "ignore"
    assert (await client.post(f"/api/v1/devices/{device_id}/credentials", headers=writer)).status_code == 404
    assert (
        await client.delete(f"/api/v1/devices/{device_id}/credentials", headers=writer)
    ).status_code == 404


async def test_emqx_authorisation_confines_devices_and_services_to_their_topics(
    make_client: ClientFactory, writer: dict[str, str], unique: str
) -> None:
    client = await hooks_client(make_client)
    me, other = f"a-{unique}", f"b-{unique}"
    await create(client, writer, me)
    await create(client, writer, other)
    allowed = [
        ("publish", f"devices/telemetry/{me}"),
        ("publish", f"devices/status/{me}"),
        ("publish", f"devices/commands/{me}/ack"),
        ("subscribe", f"devices/commands/{me}"),
        ("publish", f"devices/state/{me}/reported"),
        ("subscribe", f"devices/state/{me}/desired"),
    ]
    denied = [
        ("publish", f"devices/state/{other}/reported"),
        ("publish", f"devices/state/{me}/desired"),
        ("subscribe", f"devices/state/{other}/desired"),
        ("subscribe", "devices/state/+/desired"),
        ("subscribe", f"devices/state/{me}/reported"),
        ("publish", f"devices/telemetry/{other}"),
        ("publish", f"devices/commands/{me}"),
        ("publish", "devices/telemetry/+"),
        ("subscribe", f"devices/commands/{other}"),
        ("subscribe", "devices/commands/+"),
        ("subscribe", "devices/#"),
        ("subscribe", "#"),
        ("subscribe", f"devices/telemetry/{me}"),
        ("subscribe", f"$share/g/devices/commands/{me}"),
        ("all", f"devices/telemetry/{me}"),
    ]
    for action, topic in allowed:
        assert await authz(client, me, action, topic) == "allow", (action, topic)
    for action, topic in denied:
        assert await authz(client, me, action, topic) == "deny", (action, topic)
    # A user name without credentials gets nothing.
    assert await authz(client, f"ghost-{unique}", "publish", f"devices/telemetry/ghost-{unique}") == "deny"

    assert (await authn(client, "ingest", INGEST_PASSWORD))["result"] == "allow"
    assert (await authn(client, "ingest", "wrong-password-000000"))["result"] == "deny"
    assert await authz(client, "ingest", "subscribe", "$share/ingest/devices/telemetry/+") == "allow"
    assert await authz(client, "ingest", "subscribe", "devices/status/+") == "allow"
    assert await authz(client, "ingest", "subscribe", "devices/#") == "deny"
    assert await authz(client, "ingest", "publish", f"devices/telemetry/{me}") == "deny"
    # Ingest records the devices' command answers and sends the commands of alert-rule actions.
    assert await authz(client, "ingest", "subscribe", "$share/ingest/devices/commands/+/ack") == "allow"
    assert await authz(client, "ingest", "publish", f"devices/commands/{me}") == "allow"
    assert await authz(client, "ingest", "publish", f"devices/commands/{me}/ack") == "deny"
    assert await authz(client, "api-1", "publish", f"devices/commands/{me}") == "allow"
    assert await authz(client, "api-1", "subscribe", "$share/api/devices/commands/+/ack") == "allow"
    assert await authz(client, "api-1", "publish", f"devices/telemetry/{me}") == "deny"
    # Device state: the API publishes desired states, ingest reads reports and re-publishes desired states.
    assert await authz(client, "api-1", "publish", f"devices/state/{me}/desired") == "allow"
    assert await authz(client, "ingest", "subscribe", "$share/ingest/devices/state/+/reported") == "allow"
    assert await authz(client, "ingest", "publish", f"devices/state/{me}/desired") == "allow"
    assert await authz(client, "ingest", "publish", f"devices/state/{me}/reported") == "deny"


async def test_hooks_need_the_shared_secret(make_client: ClientFactory, unique: str) -> None:
    client = await hooks_client(make_client)
    body = {"username": "ingest", "password": INGEST_PASSWORD}
    for path in ("/api/v1/mqtt/authn", "/api/v1/mqtt/authz"):
        payload = body if path.endswith("authn") else {**body, "action": "publish", "topic": "t"}
        missing = await client.post(path, json=payload)
        assert missing.status_code == 401
        assert missing.headers["content-type"].startswith("application/problem+json")
        wrong = await client.post(path, json=payload, headers={"X-Hook-Secret": HOOK_SECRET + "x"})
        assert wrong.status_code == 401
    disabled = await make_client()
    response = await disabled.post("/api/v1/mqtt/authn", json=body, headers=HOOK)
    assert response.status_code == 404


async def test_hooks_answer_from_the_database_while_redis_is_down(
    make_client: ClientFactory, writer: dict[str, str], unique: str
) -> None:
    client = await hooks_client(make_client)
    mqtt = (await create(client, writer, f"x-{unique}"))["mqtt"]
    down = await hooks_client(make_client, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert (await authn(down, mqtt["username"], mqtt["password"]))["result"] == "allow"
    assert await authz(down, mqtt["username"], "publish", f"devices/telemetry/x-{unique}") == "allow"


async def test_device_ids_of_platform_users_are_refused(
    make_client: ClientFactory, writer: dict[str, str]
) -> None:
    client = await hooks_client(make_client)
    for name in ("admin", "ingest", "api-1"):
        response = await client.post("/api/v1/devices", json={"id": name}, headers=writer)
        assert response.status_code == 409, response.text
        assert (await client.get(f"/api/v1/devices/{name}", headers=writer)).status_code == 404


async def test_an_unreachable_broker_means_503_and_nothing_changed(
    make_client: ClientFactory, writer: dict[str, str], unique: str
) -> None:
    plain = await hooks_client(make_client)
    device_id = f"u-{unique}"
    secret = (await create(plain, writer, device_id))["mqtt"]["password"]
    broken = await hooks_client(make_client, mqtt_admin_url=f"mqtt://admin:pw@127.0.0.1:{free_port()}")

    created = await broken.post("/api/v1/devices", json={"id": f"n-{unique}"}, headers=writer)
    assert created.status_code == 503, created.text
    assert created.headers["content-type"].startswith("application/problem+json")
    assert created.headers["retry-after"]
    assert (await broken.get(f"/api/v1/devices/n-{unique}", headers=writer)).status_code == 404

    for method, path in (
        ("POST", f"/api/v1/devices/{device_id}/credentials"),
        ("DELETE", f"/api/v1/devices/{device_id}/credentials"),
        ("DELETE", f"/api/v1/devices/{device_id}"),
    ):
        response = await broken.request(method, path, headers=writer)
        assert response.status_code == 503, (method, path, response.text)
    # The device and its credential are as they were.
    assert (await broken.get(f"/api/v1/devices/{device_id}", headers=writer)).status_code == 200
    assert (await authn(plain, device_id, secret))["result"] == "allow"
