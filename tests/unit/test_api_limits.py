"""Settings of the API's authentication limits: trusted proxies are explicit IPs or networks."""

from __future__ import annotations

import pytest
from litestar.types import Scope

from iot_api.security import client_address
from iot_api.settings import ApiSettings
from iot_common.settings import SettingsError, load_settings

SECRET = {"IOT_JWT_SECRET": "unit-test-jwt-secret-0123456789abcdefghij"}


def test_no_proxy_is_trusted_by_default() -> None:
    settings = load_settings(ApiSettings, SECRET)
    assert settings.trusted_proxies == []
    assert settings.api_password_hash_workers == 1


def test_trusted_proxies_are_ips_and_networks() -> None:
    settings = load_settings(ApiSettings, {**SECRET, "IOT_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.7,fd00::/8"})
    assert settings.trusted_proxies == ["10.0.0.0/8", "192.0.2.7", "fd00::/8"]


@pytest.mark.parametrize("value", ["*", "proxy.example.com", "10.0.0.0/40", "300.1.1.1"])
def test_a_trusted_proxy_that_is_no_address_stops_start_up(value: str) -> None:
    with pytest.raises(SettingsError, match="IOT_TRUSTED_PROXIES"):
        load_settings(ApiSettings, {**SECRET, "IOT_TRUSTED_PROXIES": value})


def _scope(host: str) -> Scope:
    return {"type": "http", "client": (host, 50000)}  # type: ignore[typeddict-item]


def test_ipv6_clients_are_counted_by_their_64_network() -> None:
    """One IPv6 host holds a whole /64: counted per address, it would get a fresh budget per address."""
    same = {client_address(_scope(h)) for h in ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff")}
    assert same == {"2001:db8:1:2::/64"}
    assert client_address(_scope("2001:db8:1:3::1")) == "2001:db8:1:3::/64"
    assert client_address(_scope("fe80::1%eth0")) == "fe80::/64"
    # IPv4 (also written as IPv4-mapped IPv6) is counted per address, as before.
    assert client_address(_scope("192.0.2.7")) == "192.0.2.7"
    assert client_address(_scope("::ffff:192.0.2.7")) == "192.0.2.7"
    assert client_address(_scope("192.0.2.8")) == "192.0.2.8"
    # A peer that is no IP address (a test client, a Unix socket) keeps its name.
    assert client_address(_scope("testclient")) == "testclient"
    assert client_address({"type": "http"}) == "unknown"  # type: ignore[typeddict-item]
