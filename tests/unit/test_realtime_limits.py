"""The realtime service's own limits: failed API keys per address (before any lookup), unknown key prefixes
remembered, subscribe frames that query PostgreSQL per credential; and the bounded structures behind them."""

from __future__ import annotations

import ipaddress
import secrets
from typing import Any

import pytest

from iot_common.auth import generate_api_key
from iot_common.net import address_key
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_realtime.gateway import Gateway, Refused
from iot_realtime.limits import ExpiringSet, RateLimiter, client_address
from iot_realtime.protocol import ERR_RATE_LIMITED, ERR_UNKNOWN_DEVICE, Subscribe
from iot_realtime.settings import RealtimeSettings
from iot_testkit.tokens import user_token

SECRET = secrets.token_urlsafe(48)
TENANT = "00000000-0000-0000-0000-000000000001"


class FakePool:
    """The two queries the gateway makes, answered from memory, and counted."""

    def __init__(self) -> None:
        self.keys: dict[str, dict[str, Any]] = {}
        self.devices: set[str] = set()
        self.key_lookups = 0
        self.device_queries = 0

    async def fetchrow(self, query: str, prefix: str) -> dict[str, Any] | None:
        self.key_lookups += 1
        return self.keys.get(prefix)

    async def fetch(self, query: str, tenant_id: str, ids: list[str]) -> list[dict[str, Any]]:
        self.device_queries += 1
        return [{"id": i} for i in ids if i in self.devices]


def gateway(pool: FakePool, **settings: Any) -> Gateway:
    config = RealtimeSettings(jwt_secret=SECRET, **settings)
    return Gateway(config, None, None, pool, None)  # type: ignore[arg-type]


def add_key(pool: FakePool) -> str:
    key, prefix, key_hash = generate_api_key()
    pool.keys[prefix] = {
        "id": "7",
        "key_hash": key_hash,
        "scopes": ["read"],
        "revoked": False,
        "tenant_id": str(DEFAULT_TENANT_ID),
        "platform_admin": False,
        "created_by": None,
        "creator_role": None,
    }
    return key


async def refusal(gw: Gateway, credential: str, peer: str) -> tuple[int, str]:
    with pytest.raises(Refused) as caught:
        await gw.authenticate(credential, peer)
    return caught.value.code, caught.value.reason


async def test_an_address_past_its_failed_keys_is_refused_before_any_lookup() -> None:
    pool = FakePool()
    gw = gateway(pool, realtime_auth_failures_per_minute=3)
    valid = add_key(pool)
    for _ in range(3):
        assert await refusal(gw, generate_api_key()[0], "203.0.113.5") == (4001, "unknown API key")
    assert pool.key_lookups == 3
    for _ in range(5):
        code, reason = await refusal(gw, generate_api_key()[0], "203.0.113.5")
        assert (code, reason) == (4029, "too many failed authentications from this address, try again later")
    assert await refusal(gw, valid, "203.0.113.5") == (4029, reason)  # its keys, valid or not
    assert pool.key_lookups == 3  # none of these reached the database
    # Another address, and a token (no database lookup) from the same address, still work.
    assert (await gw.authenticate(valid, "203.0.113.6")).subject == "key:7"
    token = user_token(SECRET, "user-1", ttl_s=60)
    assert (await gw.authenticate(token, "203.0.113.5")).subject == "user-1"


async def test_a_wrong_secret_for_a_real_prefix_counts_as_a_failure_but_does_not_lock_the_key_out() -> None:
    pool = FakePool()
    gw = gateway(pool, realtime_auth_failures_per_minute=100)
    valid = add_key(pool)
    forged = valid[: valid.rindex("_") + 1] + "x" * 32
    assert await refusal(gw, forged, "198.51.100.1") == (4001, "unknown API key")
    assert await refusal(gw, forged, "198.51.100.1") == (4001, "unknown API key")
    assert pool.key_lookups == 2  # a known prefix is not remembered as unknown
    assert (await gw.authenticate(valid, "198.51.100.2")).subject == "key:7"


async def test_a_repeated_unknown_key_costs_one_lookup() -> None:
    pool = FakePool()
    gw = gateway(pool, realtime_auth_failures_per_minute=0)  # no address limit: only the cache acts
    unknown = generate_api_key()[0]
    for _ in range(10):
        assert await refusal(gw, unknown, "192.0.2.1") == (4001, "unknown API key")
    assert pool.key_lookups == 1


async def test_subscribe_frames_that_query_the_database_are_limited_per_credential() -> None:
    pool = FakePool()
    pool.devices.add("dev-1")
    gw = gateway(pool, realtime_device_checks_per_minute=2)
    frames = [Subscribe(devices=[f"ghost-{i}"], id=i) for i in range(5)]
    errors = [await gw._check_devices(list(f.devices), f, "user-1", TENANT) for f in frames]
    assert [e.code if e else None for e in errors] == [ERR_UNKNOWN_DEVICE] * 2 + [ERR_RATE_LIMITED] * 3
    assert pool.device_queries == 2
    # Another credential has its own allowance; devices found lately need no query, so no allowance.
    ok = Subscribe(devices=["dev-1"], id=9)
    assert await gw._check_devices(["dev-1"], ok, "user-2", TENANT) is None
    assert await gw._check_devices(["dev-1"], ok, "user-2", TENANT) is None
    assert await gw._check_devices(["dev-1"], ok, "user-2", TENANT) is None
    assert pool.device_queries == 3


def test_rate_limiter_refills_over_the_minute_and_forgets_the_least_recent_key() -> None:
    now = [0.0]
    limiter = RateLimiter(2, max_tracked=2, clock=lambda: now[0])
    assert [limiter.take("a"), limiter.take("a"), limiter.take("a")] == [True, True, False]
    assert limiter.exhausted("a")
    assert not limiter.exhausted("b")
    now[0] = 30.0  # one event's worth refilled
    assert (limiter.exhausted("a"), limiter.take("a"), limiter.take("a")) == (False, True, False)
    limiter.take("b")
    limiter.take("c")  # "a" was used least recently: forgotten
    assert len(limiter) == 2
    assert not limiter.exhausted("a")
    assert RateLimiter(0).take("x")  # 0: no limit


def test_expiring_set_forgets_after_the_ttl_and_is_bounded() -> None:
    now = [0.0]
    remembered = ExpiringSet(10.0, max_size=2, clock=lambda: now[0])
    remembered.add("a")
    now[0] = 5.0
    remembered.add("b")
    assert ("a" in remembered, "b" in remembered) == (True, True)
    now[0] = 6.0
    remembered.add("c")
    assert ("a" in remembered, len(remembered)) == (False, 2)
    now[0] = 15.0
    assert ("b" in remembered, "c" in remembered) == (False, True)


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("203.0.113.5", "203.0.113.5"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.5", "203.0.113.5"),
        (None, "unknown"),
    ],
)
def test_address_keys_group_an_ipv6_64(peer: str | None, key: str) -> None:
    assert address_key(peer) == key


TRUSTED = [ipaddress.ip_network("10.0.0.0/8")]


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "trusted", "client"),
    [
        # No trusted proxy: the header is the client's own text and changes nothing.
        ("203.0.113.5", "198.51.100.7", [], "203.0.113.5"),
        # A peer that is not a trusted proxy is the client, whatever it forwards.
        ("203.0.113.5", "198.51.100.7", TRUSTED, "203.0.113.5"),
        # Behind the Ingress: the address it appended.
        ("10.1.2.3", "198.51.100.7", TRUSTED, "198.51.100.7"),
        # Entries left of the proxy's were written by the client: ignored.
        ("10.1.2.3", "1.1.1.1, 198.51.100.7", TRUSTED, "198.51.100.7"),
        # Two trusted hops: the right-most untrusted entry.
        ("10.1.2.3", "198.51.100.7, 10.9.9.9", TRUSTED, "198.51.100.7"),
        ("10.1.2.3", None, TRUSTED, "10.1.2.3"),
    ],
)
def test_the_client_address_believes_only_trusted_proxies(
    peer: str, forwarded_for: str | None, trusted: list[Any], client: str
) -> None:
    assert client_address(peer, forwarded_for, trusted) == client


def test_clients_behind_a_trusted_proxy_have_their_own_failure_budgets() -> None:
    failures = RateLimiter(2)
    for client in ("198.51.100.7", "198.51.100.8"):
        address = address_key(client_address("10.1.2.3", client, TRUSTED))
        assert failures.take(address)
        assert failures.take(address)
        assert not failures.take(address)
