"""Settings of the API's authentication limits: trusted proxies are explicit IPs or networks."""

from __future__ import annotations

import pytest

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
