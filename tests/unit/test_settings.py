from __future__ import annotations

import pytest

from iot_api.settings import ApiSettings
from iot_common.settings import BaseSettings, SettingsError, load_settings
from iot_common.topics import RedisNames
from iot_ingest.settings import IngestSettings
from iot_realtime.settings import RealtimeSettings


def test_defaults_match_the_documented_values() -> None:
    settings = load_settings(BaseSettings, {})
    assert settings.database_url == "postgresql://postgres@127.0.0.1:5432/postgres"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.mqtt_url == "mqtt://127.0.0.1:1883"
    assert load_settings(ApiSettings, {}).api_port == 8000
    assert load_settings(RealtimeSettings, {}).realtime_port == 8001
    assert load_settings(IngestSettings, {}).ingest_http_port == 8002


def test_values_come_from_iot_variables_and_are_converted() -> None:
    settings = load_settings(
        IngestSettings,
        {
            "IOT_INGEST_HTTP_PORT": "9102",
            "IOT_INGEST_AUTO_REGISTER": "true",
            "IOT_MQTT_URL": "mqtt://ingest:s3cret@broker:1883",
            "IOT_LOG_FORMAT": "json",
            "UNRELATED": "x",
        },
    )
    assert settings.ingest_http_port == 9102
    assert settings.ingest_auto_register is True
    assert settings.mqtt_url == "mqtt://ingest:s3cret@broker:1883"
    assert settings.log_format == "json"


def test_list_settings_are_comma_separated() -> None:
    settings = load_settings(ApiSettings, {"IOT_CORS_ORIGINS": "https://a.example, https://b.example"})
    assert settings.cors_origins == ["https://a.example", "https://b.example"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IOT_DATABASE_URL", "mysql://root@localhost/db"),
        ("IOT_DATABASE_URL", "not a url"),
        ("IOT_REDIS_URL", "http://127.0.0.1:6379"),
        ("IOT_MQTT_URL", "tcp://127.0.0.1"),
        ("IOT_MQTT_URL", "mqtt://host:port"),
    ],
)
def test_a_malformed_url_stops_start_up_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(BaseSettings, {variable: value})
    assert variable in str(err.value)
    assert "URL" in str(err.value)
    assert "regex" not in str(err.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IOT_API_PORT", "eighty"),
        ("IOT_API_PORT", "70000"),
        ("IOT_LOG_LEVEL", "loud"),
        ("IOT_LOG_FORMAT", "xml"),
        ("IOT_JWT_SECRET", "short"),
    ],
)
def test_a_wrong_value_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_settings(ApiSettings, {variable: value})


def test_the_redis_prefix_names_every_key_and_channel() -> None:
    assert load_settings(BaseSettings, {}).redis_names() == RedisNames("iot")
    settings = load_settings(ApiSettings, {"IOT_REDIS_PREFIX": "staging-2"})
    assert settings.redis_names().device_channel("d") == "staging-2:device:d"
    assert settings.cache_namespace() == "staging-2:api:"
    # IOT_API_CACHE_NAMESPACE, set by deployments from before IOT_REDIS_PREFIX, still wins for the API.
    legacy = load_settings(ApiSettings, {"IOT_REDIS_PREFIX": "a", "IOT_API_CACHE_NAMESPACE": "old:api:"})
    assert legacy.cache_namespace() == "old:api:"


@pytest.mark.parametrize("value", ["", "a:b", "iot*", "x" * 33, "iot\n"])
def test_a_malformed_redis_prefix_names_its_variable(value: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(RealtimeSettings, {"IOT_REDIS_PREFIX": value})
    assert "IOT_REDIS_PREFIX" in str(err.value)
    assert "no ':'" in str(err.value)


def test_cross_field_errors_name_the_variables_involved() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(BaseSettings, {"IOT_DATABASE_POOL_MIN": "20", "IOT_DATABASE_POOL_MAX": "5"})
    assert "IOT_DATABASE_POOL_MIN" in str(err.value)
