"""Limits of ``iot-realtime`` (issue 13, finding 8): connections and subscriptions per credential, a cap on
the process's connections, and subscriptions only to registered devices."""

from __future__ import annotations

import json

import pytest
import redis.asyncio as aioredis
from websockets.exceptions import InvalidStatus

from iot_common.auth import generate_api_key
from iot_testkit.processes import Start
from tests.e2e.realtime_support import (
    DEFAULT,
    Realtime,
    assert_nothing_pending,
    close_code,
    open_ws,
    recv_json,
    register,
    start_realtime,
    subscribe,
    token,
)


async def test_subscribing_to_an_unknown_device_is_refused_and_opens_no_redis_channel(
    service: Start, database_url: str, redis: aioredis.Redis, redis_url: str, unique: str
) -> None:
    realtime = start_realtime(service, database_url, redis_url)
    dev, ghost, later = f"dev-{unique}", f"ghost-{unique}", f"later-{unique}"
    await register(database_url, dev)
    async with open_ws(realtime.url(token())) as ws:
        assert await subscribe(ws, 1, [dev, ghost]) == [
            {
                "type": "error",
                "id": 1,
                "code": "unknown_device",
                "message": f"1 unknown device(s): {ghost}",
                "devices": [ghost],
            }
        ]
        # Nothing changed: not even the known device of that frame was subscribed.
        assert realtime.metric("iot_realtime_subscriptions") == 0
        assert await redis.pubsub_numsub(
            realtime.names.device_channel(DEFAULT, ghost), realtime.names.device_channel(DEFAULT, dev)
        ) == [
            (realtime.names.device_channel(DEFAULT, ghost).encode(), 0),
            (realtime.names.device_channel(DEFAULT, dev).encode(), 0),
        ]
        assert (await subscribe(ws, 2, [dev, "*"]))[-1] == {"type": "ack", "id": 2}
        # A device registered after a refusal can be subscribed at once (unknown ids are not cached).
        assert (await subscribe(ws, 3, [later]))[-1]["code"] == "unknown_device"
        await register(database_url, later)
        assert (await subscribe(ws, 4, [later]))[-1] == {"type": "ack", "id": 4}
        assert realtime.metric("iot_realtime_subscriptions") == 3


async def test_connections_per_credential_are_capped(
    service: Start, database_url: str, redis_url: str
) -> None:
    env = {"IOT_REALTIME_MAX_CONNECTIONS_PER_PRINCIPAL": "2"}
    realtime = start_realtime(service, database_url, redis_url, env)
    alice, bob = token(subject="alice"), token(subject="bob")
    async with open_ws(realtime.url(alice)) as first, open_ws(realtime.url(token(subject="alice"))) as second:
        await assert_nothing_pending(first)
        await assert_nothing_pending(second)
        async with open_ws(realtime.url(alice)) as third:  # another token of the same user counts too
            assert await close_code(third) == (4029, "too many connections for this credential (limit 2)")
        async with open_ws(realtime.url(bob)) as other:  # another credential is not affected
            await assert_nothing_pending(other)
        await first.close()
        await realtime.wait_metric("iot_realtime_connections", 1)
        async with open_ws(realtime.url(alice)) as again:  # a closed connection frees its place
            await assert_nothing_pending(again)


async def test_subscriptions_per_credential_are_capped_over_its_connections(
    service: Start, database_url: str, redis_url: str, unique: str
) -> None:
    env = {"IOT_REALTIME_MAX_SUBSCRIPTIONS_PER_PRINCIPAL": "3"}
    realtime = start_realtime(service, database_url, redis_url, env)
    devices = [f"dev{i}-{unique}" for i in range(4)]
    await register(database_url, *devices)
    alice = token(subject="alice")
    async with open_ws(realtime.url(alice)) as a, open_ws(realtime.url(alice)) as b:
        assert (await subscribe(a, 1, devices[:2]))[-1] == {"type": "ack", "id": 1}
        refused = (await subscribe(b, 2, devices[2:]))[-1]
        assert (refused["code"], refused["id"]) == ("too_many_subscriptions", 2)
        assert refused["message"] == "at most 3 subscriptions per credential, over all its connections"
        # Subscribing again to a device already held is a filter change, not one more subscription.
        assert (await subscribe(a, 3, devices[:2], metrics=["t"]))[-1] == {"type": "ack", "id": 3}
        assert (await subscribe(b, 4, devices[2:3]))[-1] == {"type": "ack", "id": 4}
        async with open_ws(realtime.url(token(subject="bob"))) as other:
            assert (await subscribe(other, 1, devices))[-1] == {"type": "error", "id": 1, **_too_many(3)}
            assert (await subscribe(other, 2, devices[:3]))[-1] == {"type": "ack", "id": 2}
        await a.send(json.dumps({"type": "unsubscribe", "id": 5, "devices": devices[:1]}))
        assert await recv_json(a) == {"type": "ack", "id": 5}
        assert (await subscribe(b, 6, devices[3:]))[-1] == {"type": "ack", "id": 6}
        await a.close()  # a closed connection gives its subscriptions back
        await realtime.wait_metric("iot_realtime_connections", 1)
        assert (await subscribe(b, 7, devices[:1]))[-1] == {"type": "ack", "id": 7}


def _too_many(limit: int) -> dict[str, str]:
    return {
        "code": "too_many_subscriptions",
        "message": f"at most {limit} subscriptions per credential, over all its connections",
    }


async def test_the_process_refuses_connections_beyond_its_cap_with_503(
    service: Start, database_url: str, redis_url: str
) -> None:
    realtime: Realtime = start_realtime(
        service, database_url, redis_url, {"IOT_REALTIME_MAX_CONNECTIONS": "2"}
    )
    # Sockets count before they authenticate: one waiting for its auth frame holds a place.
    async with open_ws(realtime.url(token(subject="a"))) as a, open_ws(realtime.url()) as pending:
        await assert_nothing_pending(a)
        with pytest.raises(InvalidStatus) as refused:
            async with open_ws(realtime.url(token(subject="b"))):
                pass
        response = refused.value.response
        assert (response.status_code, response.headers["Retry-After"]) == (503, "5")
        assert b"too many connections" in response.body
        await pending.send(json.dumps({"type": "auth", "token": token(subject="c"), "id": 1}))
        assert await recv_json(pending) == {"type": "ack", "id": 1}
    await realtime.wait_metric("iot_realtime_sockets", 0)
    async with open_ws(realtime.url(token(subject="b"))) as b:
        await assert_nothing_pending(b)


async def test_failed_api_keys_of_an_address_are_refused_before_any_lookup(
    service: Start, database_url: str, redis_url: str
) -> None:
    env = {"IOT_REALTIME_AUTH_FAILURES_PER_MINUTE": "3"}
    realtime = start_realtime(service, database_url, redis_url, env)
    lookups = "iot_realtime_api_key_lookups_total"
    repeated = generate_api_key()[0]
    for _ in range(2):  # the same unknown key twice: one lookup, then its prefix is remembered
        async with open_ws(realtime.url(repeated)) as ws:
            assert await close_code(ws) == (4001, "unknown API key")
    assert realtime.metric(lookups) == 1
    async with open_ws(realtime.url(generate_api_key()[0])) as ws:  # a third failure from this address
        assert await close_code(ws) == (4001, "unknown API key")
    assert realtime.metric(lookups) == 2
    for credential in (generate_api_key()[0], repeated):
        async with open_ws(realtime.url(credential)) as ws:
            assert await close_code(ws) == (
                4029,
                "too many failed authentications from this address, try again later",
            )
    assert realtime.metric(lookups) == 2  # past the limit, nothing reaches the database
    async with open_ws(realtime.url(token())) as ws:  # a token costs no lookup: still accepted
        await assert_nothing_pending(ws)


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_failure_budget(
    service: Start, database_url: str, redis_url: str
) -> None:
    """Behind the Ingress every connection comes from its address: with IOT_TRUSTED_PROXIES the one it
    forwards is counted, so one client's bad keys do not lock out the others."""
    env = {"IOT_REALTIME_AUTH_FAILURES_PER_MINUTE": "2", "IOT_TRUSTED_PROXIES": "127.0.0.1"}
    realtime = start_realtime(service, database_url, redis_url, env)

    async def bad_key_from(client: str) -> tuple[int, str]:
        forwarded = {"X-Forwarded-For": f"1.2.3.4, {client}"}  # the left entry is the client's own text
        async with open_ws(realtime.url(generate_api_key()[0]), additional_headers=forwarded) as ws:
            return await close_code(ws)

    assert [await bad_key_from("198.51.100.7") for _ in range(3)][-1][0] == 4029
    assert await bad_key_from("198.51.100.8") == (4001, "unknown API key")


async def test_subscribe_frames_that_check_devices_are_limited_per_credential(
    service: Start, database_url: str, redis_url: str, unique: str
) -> None:
    env = {"IOT_REALTIME_DEVICE_CHECKS_PER_MINUTE": "2"}
    realtime = start_realtime(service, database_url, redis_url, env)
    dev = f"dev-{unique}"
    await register(database_url, dev)
    async with open_ws(realtime.url(token(subject="alice"))) as ws:
        assert (await subscribe(ws, 1, [dev]))[-1] == {"type": "ack", "id": 1}
        assert (await subscribe(ws, 2, [f"ghost-{unique}"]))[-1]["code"] == "unknown_device"
        limited = (await subscribe(ws, 3, [f"ghost2-{unique}"]))[-1]
        assert (limited["code"], limited["id"]) == ("rate_limited", 3)
        await ws.send(json.dumps({"type": "unsubscribe", "id": 4, "devices": [dev]}))
        assert await recv_json(ws) == {"type": "ack", "id": 4}
        # A device found lately needs no query, so no allowance.
        assert (await subscribe(ws, 5, [dev]))[-1] == {"type": "ack", "id": 5}
    async with open_ws(realtime.url(token(subject="bob"))) as ws:  # another credential: its own allowance
        assert (await subscribe(ws, 1, [f"ghost2-{unique}"]))[-1]["code"] == "unknown_device"
