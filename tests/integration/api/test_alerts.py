"""Alert rules and alerts against the real database and Redis: CRUD, filters, pagination, errors, scopes,
the ``{prefix}:rules-changed`` publication and the ``alert`` event an acknowledgement publishes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient

from iot_common.messages import AlertEvent, decode_event
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_common.topics import RedisNames
from iot_testkit.channels import subscribe_confirmed
from tests.integration.api.test_devices import assert_problem

Client = AsyncTestClient[Any]
RULES = "/api/v1/alert-rules"


async def next_message(pubsub: Any, timeout: float = 5.0) -> bytes:
    """The next published message on ``pubsub`` (subscription confirmations skipped)."""

    async def read() -> bytes:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
            if message is not None:
                data: bytes = message["data"]
                return data

    return await asyncio.wait_for(read(), timeout)


@pytest.fixture
async def rules_channel(redis: aioredis.Redis, redis_names: RedisNames) -> AsyncIterator[Any]:
    pubsub = redis.pubsub()
    await subscribe_confirmed(pubsub, redis_names.rules_changed)
    yield pubsub
    await pubsub.aclose()


async def make_device(client: Client, headers: dict[str, str], device_id: str, type_: str = "thermo") -> None:
    response = await client.post("/api/v1/devices", json={"id": device_id, "type": type_}, headers=headers)
    assert response.status_code == 201, response.text


def rule_body(**overrides: Any) -> dict[str, Any]:
    return {"name": "hot", "metric": "temperature", "op": ">", "threshold": 30.0, **overrides}


async def test_rule_crud_publishes_each_change(
    client: Client,
    writer: dict[str, str],
    reader: dict[str, str],
    admin: dict[str, str],
    unique: str,
    rules_channel: Any,
) -> None:
    device_id = f"dev-{unique}"
    await make_device(client, writer, device_id)
    created = await client.post(
        RULES,
        json=rule_body(
            device_id=device_id,
            for_seconds=10,
            hysteresis=0.5,
            severity="critical",
            message="too hot",
            action={"type": "command", "name": "fan_on", "params": {"speed": 3}, "on": ["open", "resolve"]},
        ),
        headers=writer,
    )
    assert created.status_code == 201, created.text
    rule = created.json()
    assert rule["device_id"] == device_id
    assert rule["device_type"] is None
    assert rule["action"] == {
        "type": "command",
        "name": "fan_on",
        "params": {"speed": 3},
        "expires_s": None,
        "on": ["open", "resolve"],
    }
    assert rule["enabled"] is True
    assert rule["for_seconds"] == 10
    assert rule["severity"] == "critical"
    change = msgspec.json.decode(await next_message(rules_channel))
    assert change == {"rule_id": rule["id"], "change": "created"}

    got = await client.get(f"{RULES}/{rule['id']}", headers=reader)
    assert got.status_code == 200
    assert got.json() == rule

    webhook = {"type": "webhook", "url": "https://hooks.example.com/x", "headers": {"X-T": "1"}}
    change_body = {"threshold": 35, "enabled": False, "action": webhook}
    # A webhook lets ingest POST anywhere: it takes the admin scope.
    assert_problem(await client.patch(f"{RULES}/{rule['id']}", json=change_body, headers=writer), 403)
    patched = await client.patch(f"{RULES}/{rule['id']}", json=change_body, headers=admin)
    assert patched.status_code == 200, patched.text
    assert patched.json()["threshold"] == 35.0
    assert patched.json()["enabled"] is False
    assert patched.json()["action"] == {
        "type": "webhook",
        "url": "https://hooks.example.com/x",
        "header_names": ["X-T"],
        "on": ["open"],
    }
    assert patched.json()["name"] == "hot"
    assert msgspec.json.decode(await next_message(rules_channel))["change"] == "updated"

    # Move the rule from the device to its type; remove the action (a webhook rule: admin only).
    moved = await client.patch(
        f"{RULES}/{rule['id']}",
        json={"device_id": None, "device_type": "thermo", "action": None},
        headers=admin,
    )
    assert moved.status_code == 200, moved.text
    assert moved.json()["device_id"] is None
    assert moved.json()["device_type"] == "thermo"
    assert moved.json()["action"] is None
    await next_message(rules_channel)

    deleted = await client.delete(f"{RULES}/{rule['id']}", headers=writer)
    assert deleted.status_code == 204
    change = msgspec.json.decode(await next_message(rules_channel))
    assert change == {"rule_id": rule["id"], "change": "deleted"}
    assert_problem(await client.get(f"{RULES}/{rule['id']}", headers=reader), 404)
    assert_problem(await client.delete(f"{RULES}/{rule['id']}", headers=writer), 404)
    assert_problem(await client.patch(f"{RULES}/{rule['id']}", json={}, headers=writer), 404)


async def test_rule_writes_need_the_write_scope(
    client: Client, reader: dict[str, str], writer: dict[str, str], unique: str
) -> None:
    body = rule_body(device_type=f"t-{unique}")
    assert_problem(await client.post(RULES, json=body), 401)
    assert_problem(await client.post(RULES, json=body, headers=reader), 403)
    rule = (await client.post(RULES, json=body, headers=writer)).json()
    assert_problem(await client.patch(f"{RULES}/{rule['id']}", json={}, headers=reader), 403)
    assert_problem(await client.delete(f"{RULES}/{rule['id']}", headers=reader), 403)
    assert (await client.get(RULES, headers=reader)).status_code == 200
    assert_problem(await client.get(RULES), 401)


async def test_invalid_rules_are_422_naming_the_field(
    client: Client, writer: dict[str, str], unique: str
) -> None:
    post = client.post
    assert_problem(await post(RULES, json=rule_body(), headers=writer), 422, "device_id")
    both = rule_body(device_id="a", device_type="b")
    assert_problem(await post(RULES, json=both, headers=writer), 422, "device_id")
    unknown = rule_body(device_id=f"nope-{unique}")
    assert_problem(await post(RULES, json=unknown, headers=writer), 422, "device_id")
    typed = {"device_type": "thermo"}
    assert_problem(await post(RULES, json=rule_body(op="=>", **typed), headers=writer), 422, "op")
    assert_problem(await post(RULES, json=rule_body(metric="1x", **typed), headers=writer), 422, "metric")
    assert_problem(await post(RULES, json=rule_body(severity="x", **typed), headers=writer), 422, "severity")
    assert_problem(
        await post(RULES, json=rule_body(for_seconds=-1, **typed), headers=writer), 422, "for_seconds"
    )
    assert_problem(
        await post(RULES, json=rule_body(hysteresis=-1, **typed), headers=writer), 422, "hysteresis"
    )
    too_big = rule_body(threshold=1e301, **typed)
    assert_problem(await post(RULES, json=too_big, headers=writer), 422, "threshold")
    # JSON numbers beyond a double's range are refused when the body is read.
    huge = '{"name":"x","metric":"m","op":">","threshold":1e400,"device_type":"t"}'
    response = await post(RULES, content=huge, headers={**writer, "content-type": "application/json"})
    assert_problem(response, 400)
    missing = {"metric": "m", "op": ">", "threshold": 1, **typed}
    assert_problem(await post(RULES, json=missing, headers=writer), 422, "name")
    bad_action = rule_body(action={"type": "email", "to": "x"}, **typed)
    assert_problem(await post(RULES, json=bad_action, headers=writer), 422, "action.type")
    bad_url = rule_body(action={"type": "webhook", "url": "ftp://x"}, **typed)
    assert_problem(await post(RULES, json=bad_url, headers=writer), 422, "action.url")
    bad_on = rule_body(action={"type": "command", "name": "x", "on": ["close"]}, **typed)
    assert_problem(await post(RULES, json=bad_on, headers=writer), 422, "action.on[0]")
    bad_cmd = rule_body(action={"type": "command", "name": "reboot", "params": {"a": "\x00"}}, **typed)
    assert_problem(await post(RULES, json=bad_cmd, headers=writer), 422, "action.params.a")
    rule = (await post(RULES, json=rule_body(**typed), headers=writer)).json()
    # A rule must keep exactly one target, and fields that are not nullable refuse null.
    both_null = {"device_type": None}
    patch = client.patch
    assert_problem(await patch(f"{RULES}/{rule['id']}", json=both_null, headers=writer), 422, "device_id")
    assert_problem(await patch(f"{RULES}/{rule['id']}", json={"name": None}, headers=writer), 422, "name")
    assert_problem(await patch(f"{RULES}/{rule['id']}", json={"bogus": 1}, headers=writer), 422)
    assert_problem(await client.get(f"{RULES}/not-a-uuid", headers=writer), 404)
    assert_problem(await client.get(f"{RULES}?cursor=zzz", headers=writer), 422, "cursor")


async def test_rule_list_filters_and_pages_newest_first(
    client: Client, writer: dict[str, str], unique: str
) -> None:
    device_id = f"dev-{unique}"
    await make_device(client, writer, device_id)
    ids = []
    for i in range(5):
        target = {"device_id": device_id} if i % 2 == 0 else {"device_type": f"type-{unique}"}
        body = rule_body(name=f"r{i}", enabled=i != 4, **target)
        ids.append((await client.post(RULES, json=body, headers=writer)).json()["id"])

    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get(RULES, params=params, headers=writer)).json()
        seen += [r["id"] for r in page["items"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert seen == ids[::-1]

    by_device = (await client.get(RULES, params={"device_id": device_id}, headers=writer)).json()
    assert [r["id"] for r in by_device["items"]] == [ids[4], ids[2], ids[0]]
    by_type = (await client.get(RULES, params={"device_type": f"type-{unique}"}, headers=writer)).json()
    assert [r["id"] for r in by_type["items"]] == [ids[3], ids[1]]
    disabled = (await client.get(RULES, params={"enabled": "false"}, headers=writer)).json()
    assert [r["id"] for r in disabled["items"]] == [ids[4]]


async def insert_alert(
    db: asyncpg.Connection[Any],
    rule_id: str,
    device_id: str,
    opened_at: datetime,
    *,
    severity: str = "warning",
    state: str = "open",
) -> str:
    """An alert as the ingest service writes it."""
    alert_id = await db.fetchval(
        """
        INSERT INTO alerts (rule_id, device_id, metric, severity, message, value, threshold, state,
                            opened_at, resolved_at)
        VALUES ($1, $2, 'temperature', $3, 'too hot', 31.5, 30, $4, $5::timestamptz,
                CASE WHEN $4 = 'resolved' THEN $5::timestamptz + interval '1 minute' END)
        RETURNING id
        """,
        uuid.UUID(rule_id),
        device_id,
        severity,
        state,
        opened_at,
    )
    return str(alert_id)


async def test_alerts_list_filters_pages_and_get(
    client: Client, writer: dict[str, str], reader: dict[str, str], db: asyncpg.Connection[Any], unique: str
) -> None:
    dev_a, dev_b = f"a-{unique}", f"b-{unique}"
    await make_device(client, writer, dev_a)
    await make_device(client, writer, dev_b)
    rule = (await client.post(RULES, json=rule_body(device_type="thermo"), headers=writer)).json()
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    ids = [
        await insert_alert(db, rule["id"], dev_a, t0, severity="info", state="resolved"),
        await insert_alert(db, rule["id"], dev_b, t0 + timedelta(minutes=1), severity="critical"),
        await insert_alert(db, rule["id"], dev_a, t0 + timedelta(minutes=2)),
    ]

    async def listed(**params: Any) -> list[str]:
        response = await client.get("/api/v1/alerts", params=params, headers=reader)
        assert response.status_code == 200, response.text
        return [a["id"] for a in response.json()["items"]]

    assert await listed() == ids[::-1]
    assert await listed(device_id=dev_a) == [ids[2], ids[0]]
    assert await listed(state="open") == [ids[2], ids[1]]
    assert await listed(state="resolved") == [ids[0]]
    assert await listed(severity="critical") == [ids[1]]
    window = {"from": (t0 + timedelta(minutes=1)).isoformat(), "to": (t0 + timedelta(minutes=2)).isoformat()}
    assert await listed(**window) == [ids[1]]

    first = (await client.get("/api/v1/alerts", params={"limit": 2}, headers=reader)).json()
    assert first["has_more"] is True
    rest = (
        await client.get(
            "/api/v1/alerts", params={"limit": 2, "cursor": first["next_cursor"]}, headers=reader
        )
    ).json()
    assert [a["id"] for a in first["items"] + rest["items"]] == ids[::-1]
    assert rest["has_more"] is False

    alert = (await client.get(f"/api/v1/alerts/{ids[0]}", headers=reader)).json()
    assert alert["state"] == "resolved"
    assert alert["resolved_at"] is not None
    assert alert["value"] == 31.5
    assert alert["acked_at"] is None
    assert alert["rule_id"] == rule["id"]
    assert_problem(await client.get(f"/api/v1/alerts/{uuid.uuid4()}", headers=reader), 404)
    assert_problem(await client.get("/api/v1/alerts/nope", headers=reader), 404)
    assert_problem(await client.get("/api/v1/alerts?state=closed", headers=reader), 422, "state")
    assert_problem(await client.get("/api/v1/alerts?severity=low", headers=reader), 422, "severity")
    assert_problem(await client.get("/api/v1/alerts?from=yesterday", headers=reader), 422, "from")
    assert_problem(await client.get("/api/v1/alerts"), 401)


async def test_ack_is_idempotent_and_publishes_an_alert_event(
    client: Client,
    writer: dict[str, str],
    reader: dict[str, str],
    db: asyncpg.Connection[Any],
    redis: aioredis.Redis,
    redis_names: RedisNames,
    unique: str,
) -> None:
    device_id = f"dev-{unique}"
    await make_device(client, writer, device_id)
    rule = (await client.post(RULES, json=rule_body(device_id=device_id), headers=writer)).json()
    alert_id = await insert_alert(db, rule["id"], device_id, datetime.now(UTC))
    pubsub = redis.pubsub()
    await subscribe_confirmed(pubsub, redis_names.device_channel(DEFAULT_TENANT_ID, device_id))
    try:
        assert_problem(await client.post(f"/api/v1/alerts/{alert_id}/ack", headers=reader), 403)
        acked = await client.post(f"/api/v1/alerts/{alert_id}/ack", headers=writer)
        assert acked.status_code == 200, acked.text
        body = acked.json()
        assert body["acked_at"] is not None
        assert body["acked_by"].startswith("key:")
        event = decode_event(await next_message(pubsub))
        assert isinstance(event, AlertEvent)
        assert event.id == alert_id
        assert event.state == "open"
        assert event.acked_at is not None
        assert event.device_id == device_id
        assert event.rule_id == rule["id"]

        again = await client.post(f"/api/v1/alerts/{alert_id}/ack", headers=writer)
        assert again.status_code == 200
        assert again.json() == body
        # Acknowledging twice publishes nothing more.
        assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.3) is None
    finally:
        await pubsub.aclose()
    assert_problem(await client.post(f"/api/v1/alerts/{uuid.uuid4()}/ack", headers=writer), 404)
    assert_problem(await client.post("/api/v1/alerts/x/ack", headers=writer), 404)


SECRET_HEADERS = {"Authorization": "Bearer s3cret-admin-token", "X-Tenant": "tenant-value-9f3c"}


async def stored_action(db: asyncpg.Connection[Any], rule_id: str) -> dict[str, Any]:
    action: dict[str, Any] = await db.fetchval(
        "SELECT action FROM alert_rules WHERE id = $1", uuid.UUID(rule_id)
    )
    return action


async def test_webhook_headers_are_write_only(
    client: Client, admin: dict[str, str], reader: dict[str, str], db: asyncpg.Connection[Any], unique: str
) -> None:
    """Responses name a webhook's headers, never their values; an update without ``headers`` keeps them."""
    hook = {"type": "webhook", "url": "https://hooks.example.com/a", "headers": SECRET_HEADERS}
    created = await client.post(RULES, json=rule_body(device_type=f"t-{unique}", action=hook), headers=admin)
    assert created.status_code == 201, created.text
    rule_id = created.json()["id"]
    shown = {
        "type": "webhook",
        "url": "https://hooks.example.com/a",
        "header_names": ["Authorization", "X-Tenant"],
    }
    assert created.json()["action"] == {**shown, "on": ["open"]}
    for response in (
        created,
        await client.get(f"{RULES}/{rule_id}", headers=reader),
        await client.get(RULES, headers=reader),
    ):
        assert response.status_code in (200, 201)
        assert "s3cret" not in response.text
        assert "tenant-value-9f3c" not in response.text
    assert (await client.get(f"{RULES}/{rule_id}", headers=reader)).json()["action"] == {
        **shown,
        "on": ["open"],
    }
    assert (await stored_action(db, rule_id))["headers"] == SECRET_HEADERS

    # Clients never see the values, so an update that leaves ``headers`` out keeps them.
    moved = {"type": "webhook", "url": "https://hooks.example.com/b", "on": ["open", "resolve"]}
    patched = await client.patch(f"{RULES}/{rule_id}", json={"action": moved}, headers=admin)
    assert patched.status_code == 200, patched.text
    assert patched.json()["action"]["header_names"] == ["Authorization", "X-Tenant"]
    assert "s3cret" not in patched.text
    stored = await stored_action(db, rule_id)
    assert stored["url"] == "https://hooks.example.com/b"
    assert stored["headers"] == SECRET_HEADERS
    cleared = await client.patch(
        f"{RULES}/{rule_id}", json={"action": {**moved, "headers": {}}}, headers=admin
    )
    assert cleared.json()["action"]["header_names"] == []
    assert (await stored_action(db, rule_id))["headers"] == {}

    # The OpenAPI document describes what responses hold.
    spec = (await client.get("/api/docs/openapi.json")).json()
    view = spec["components"]["schemas"]["WebhookActionView"]
    assert "header_names" in view["properties"]
    assert "headers" not in view["properties"]


async def test_changing_or_deleting_a_webhook_rule_needs_admin(
    client: Client, admin: dict[str, str], writer: dict[str, str], db: asyncpg.Connection[Any], unique: str
) -> None:
    """A write key must not make ingest send its own text to an admin's URL with the admin's headers."""
    hook = {"type": "webhook", "url": "https://hooks.example.com/a", "headers": SECRET_HEADERS}
    body = rule_body(device_type=f"t-{unique}", action=hook, message="disk full")
    rule = (await client.post(RULES, json=body, headers=admin)).json()
    path = f"{RULES}/{rule['id']}"
    for change in ({"message": "send this text"}, {"threshold": -1e9}, {"action": None}, {"enabled": False}):
        assert_problem(await client.patch(path, json=change, headers=writer), 403)
    assert_problem(await client.delete(path, headers=writer), 403)
    unchanged = (await client.get(path, headers=writer)).json()
    assert unchanged["message"] == "disk full"
    assert unchanged["threshold"] == 30.0
    assert (await stored_action(db, rule["id"]))["headers"] == SECRET_HEADERS
    # A rule without a webhook stays the writers'; the admin may change and delete the webhook rule.
    plain = (await client.post(RULES, json=rule_body(device_type=f"t-{unique}"), headers=writer)).json()
    assert (
        await client.patch(f"{RULES}/{plain['id']}", json={"message": "m"}, headers=writer)
    ).status_code == 200
    assert (await client.patch(path, json={"message": "m"}, headers=admin)).status_code == 200
    assert (await client.delete(path, headers=admin)).status_code == 204


async def test_an_acknowledgement_keeps_the_operators_note(
    client: Client, writer: dict[str, str], db: asyncpg.Connection[Any], unique: str
) -> None:
    device_id = f"note-{unique}"
    await make_device(client, writer, device_id)
    rule = (await client.post(RULES, json=rule_body(device_id=device_id), headers=writer)).json()
    alert_id = await insert_alert(db, rule["id"], device_id, datetime.now(UTC))
    ack = f"/api/v1/alerts/{alert_id}/ack"
    too_long = await client.post(ack, json={"note": "x" * 501}, headers=writer)
    assert_problem(too_long, 422)
    assert too_long.json()["errors"][0]["field"] == "note"
    assert_problem(await client.post(ack, json={"note": "a\u0000b"}, headers=writer), 422)
    assert_problem(await client.post(ack, json={"note": "ok", "by": "me"}, headers=writer), 422)
    acked = await client.post(ack, json={"note": "valve replaced"}, headers=writer)
    assert acked.status_code == 200, acked.text
    assert acked.json()["ack_note"] == "valve replaced"
    # Acknowledging again keeps the first note.
    again = await client.post(ack, json={"note": "something else"}, headers=writer)
    assert again.json()["ack_note"] == "valve replaced"
    assert (await client.get(f"/api/v1/alerts/{alert_id}", headers=writer)).json()[
        "ack_note"
    ] == "valve replaced"
