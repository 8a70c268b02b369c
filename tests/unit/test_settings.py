from __future__ import annotations

import secrets

import pytest

from iot_api.rollup import RollupRetention
from iot_api.settings import ApiSettings
from iot_common.settings import BaseSettings, SettingsError, load_settings
from iot_common.topics import RedisNames
from iot_common.weak_secrets import PUBLISHED_SECRETS
from iot_ingest.settings import IngestSettings
from iot_realtime.settings import RealtimeSettings

SECRET = {"IOT_JWT_SECRET": "unit-test-jwt-secret-0123456789abcdefghij"}


def test_defaults_match_the_documented_values() -> None:
    settings = load_settings(BaseSettings, {})
    assert settings.database_url == "postgresql://postgres@127.0.0.1:5432/postgres"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.mqtt_url == "mqtt://127.0.0.1:1883"
    assert settings.startup_wait_s == 0
    assert load_settings(ApiSettings, SECRET).api_port == 8000
    assert load_settings(RealtimeSettings, SECRET).realtime_port == 8001
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
    settings = load_settings(
        ApiSettings, {**SECRET, "IOT_CORS_ORIGINS": "https://a.example, https://b.example"}
    )
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
        ("IOT_STARTUP_WAIT_S", "-1"),
        ("IOT_STARTUP_WAIT_S", "a minute"),
    ],
)
def test_a_wrong_value_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_settings(ApiSettings, {**SECRET, variable: value})


def test_the_redis_prefix_names_every_key_and_channel() -> None:
    assert load_settings(BaseSettings, {}).redis_names() == RedisNames("iot")
    settings = load_settings(ApiSettings, {**SECRET, "IOT_REDIS_PREFIX": "staging-2"})
    assert settings.redis_names().device_channel("t", "d") == "staging-2:tenant:t:device:d"
    assert settings.cache_namespace() == "staging-2:api:"
    # IOT_API_CACHE_NAMESPACE, set by deployments from before IOT_REDIS_PREFIX, still wins for the API.
    legacy = load_settings(
        ApiSettings, {**SECRET, "IOT_REDIS_PREFIX": "a", "IOT_API_CACHE_NAMESPACE": "old:api:"}
    )
    assert legacy.cache_namespace() == "old:api:"


@pytest.mark.parametrize("value", ["", "a:b", "iot*", "x" * 33, "iot\n"])
def test_a_malformed_redis_prefix_names_its_variable(value: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(RealtimeSettings, {**SECRET, "IOT_REDIS_PREFIX": value})
    assert "IOT_REDIS_PREFIX" in str(err.value)
    assert "no ':'" in str(err.value)


def test_cross_field_errors_name_the_variables_involved() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(BaseSettings, {"IOT_DATABASE_POOL_MIN": "20", "IOT_DATABASE_POOL_MAX": "5"})
    assert "IOT_DATABASE_POOL_MIN" in str(err.value)


@pytest.mark.parametrize("settings", [ApiSettings, RealtimeSettings])
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (None, "is not set"),
        ("", "is not set"),
        ("x" * 31, "is shorter than 32 bytes"),
        ("é" * 15, "is shorter than 32 bytes"),
        *[(secret, "placeholder") for secret in sorted(PUBLISHED_SECRETS) if len(secret) >= 32],
        ("please-CHANGE_ME-before-production-0123456789", "placeholder"),
        ("replace-me-with-32-random-characters-000000", "placeholder"),
        ("0" * 64, "fewer than 8 different characters"),
    ],
)
def test_the_jwt_secret_has_no_default_and_refuses_weak_values(
    settings: type[ApiSettings] | type[RealtimeSettings], value: str | None, problem: str
) -> None:
    env = {} if value is None else {"IOT_JWT_SECRET": value}
    with pytest.raises(SettingsError) as err:
        load_settings(settings, env)
    message = str(err.value)
    assert message.startswith("invalid configuration: IOT_JWT_SECRET ")
    assert problem in message
    assert "\n" not in message


def test_a_random_jwt_secret_is_accepted() -> None:
    secret = secrets.token_urlsafe(32)
    assert load_settings(RealtimeSettings, {"IOT_JWT_SECRET": secret}).jwt_secret == secret


@pytest.mark.parametrize("password", ["admin-password", "compose-dev-admin-password", "changeme123"])
def test_a_published_bootstrap_admin_password_is_refused(password: str) -> None:
    env = {
        **SECRET,
        "IOT_BOOTSTRAP_ADMIN_EMAIL": "admin@example.com",
        "IOT_BOOTSTRAP_ADMIN_PASSWORD": password,
    }
    with pytest.raises(SettingsError, match="IOT_BOOTSTRAP_ADMIN_PASSWORD"):
        load_settings(ApiSettings, env)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IOT_MQTT_HOOK_SECRET", "REPLACE_ME_hook_secret_0123"),
        ("IOT_MQTT_SERVICE_USERS", "ingest:ingest:changeme-changeme-0123"),
        ("IOT_MQTT_ADMIN_URL", "mqtt://admin:REPLACE_ME@mqtt.example.internal:1883"),
        ("IOT_MQTT_ADMIN_URL", "mqtt://admin:compose-dev-admin-password@mosquitto:1883"),
    ],
)
def test_the_api_refuses_placeholder_broker_secrets(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(ApiSettings, {**SECRET, variable: value})
    assert str(err.value).startswith(f"invalid configuration: {variable} ")
    assert value not in str(err.value)


def test_the_api_accepts_random_broker_secrets() -> None:
    password = secrets.token_urlsafe(24)
    settings = load_settings(
        ApiSettings,
        {
            **SECRET,
            "IOT_MQTT_HOOK_SECRET": secrets.token_urlsafe(24),
            "IOT_MQTT_SERVICE_USERS": f"ingest:ingest:{password}",
            "IOT_MQTT_ADMIN_URL": f"mqtt://admin:{password}@mosquitto:1883",
        },
    )
    assert settings.mqtt_service_users == [f"ingest:ingest:{password}"]


def test_a_quota_burst_smaller_than_a_full_message_names_both_variables() -> None:
    env = {"IOT_INGEST_MAX_READINGS": "1000", "IOT_INGEST_MAX_READINGS_PER_DEVICE_BURST": "999"}
    with pytest.raises(SettingsError) as err:
        load_settings(IngestSettings, env)
    assert "IOT_INGEST_MAX_READINGS_PER_DEVICE_BURST" in str(err.value)
    assert "IOT_INGEST_MAX_READINGS " in str(err.value)
    # With the quota off the burst is not used, so it is not checked.
    off = load_settings(IngestSettings, {**env, "IOT_INGEST_MAX_READINGS_PER_DEVICE_S": "0"})
    assert off.ingest_max_readings_per_device_burst == 999


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("", None),
        ("ws://localhost:8001/ws", "ws://localhost:8001/ws"),
        ("wss://rt.example.com/live/ws", "wss://rt.example.com/live/ws"),
        ("ws://[::1]:9001/ws", "ws://[::1]:9001/ws"),
        # Without a path: the realtime service's own /ws.
        ("ws://localhost:8001", "ws://localhost:8001/ws"),
        # A path on the dashboard's own host (behind an Ingress), resolved by the page.
        ("/ws", "/ws"),
        ("/realtime/ws", "/realtime/ws"),
    ],
)
def test_the_public_realtime_url_is_a_websocket_url_or_a_path(value: str, url: str | None) -> None:
    settings = load_settings(ApiSettings, {**SECRET, "IOT_PUBLIC_REALTIME_URL": value})
    assert settings.realtime_url() == url


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("http://localhost:8001/ws", "http:// is not a WebSocket scheme"),
        ("https://rt.example.com/ws", "https:// is not a WebSocket scheme"),
        ("localhost:8001/ws", "localhost:8001/ws"),
        ("ws", "'ws' is not valid"),
        ("//evil.example.com/ws", "is not valid"),  # another host, not a path
        ("ws://user:pass@rt.example.com/ws", "must not hold a user or password"),
        ("ws://rt.example.com/ws?x=1", "has a query or fragment"),
        ("ws://rt.example.com/ws#top", "has a query or fragment"),
        ("ws://rt.example.com:0/ws", "port 0 is not between 1 and 65535"),
        ("ws://rt.example.com:70000/ws", "port 70000 is not between 1 and 65535"),
        ("ws://rt example.com/ws", "is not valid"),
        ("ws://rt.example.com;script-src *", "is not valid"),
        ("ws://[::1/ws", "is not a URL"),
        ("/ws\n", "is not valid"),
    ],
)
def test_a_malformed_public_realtime_url_stops_start_up_naming_the_variable(value: str, problem: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(ApiSettings, {**SECRET, "IOT_PUBLIC_REALTIME_URL": value})
    message = str(err.value)
    assert message.startswith("invalid configuration: IOT_PUBLIC_REALTIME_URL")
    assert problem in message
    if "port" not in problem:  # says what it expects
        assert "expected a ws:// or wss:// URL" in message
        assert "a path on the dashboard's own host such as /ws" in message
    assert "user:pass" not in message


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"IOT_TELEMETRY_RETENTION_DAYS": "90"}, "IOT_ROLLUP_RETENTION_DAYS_MINUTE=30 is less than"),
        ({"IOT_ROLLUP_RETENTION_DAYS_HOUR": "20"}, "IOT_ROLLUP_RETENTION_DAYS_HOUR=20 is less than"),
        ({"IOT_ROLLUP_RETENTION_DAYS_DAY": "365"}, "IOT_ROLLUP_RETENTION_DAYS_DAY=365 is less than"),
        ({"IOT_ROLLUP_RETENTION_DAYS_MINUTE": "0"}, "IOT_ROLLUP_RETENTION_DAYS_MINUTE: Expected `int` >= 1"),
        ({"IOT_ROLLUP_RETENTION_DAYS_DAY": "ten"}, "IOT_ROLLUP_RETENTION_DAYS_DAY"),
        ({"IOT_API_ROLLUP_LAG_S": "30"}, "IOT_API_ROLLUP_LAG_S=30 is less than 60"),
    ],
)
def test_rollup_settings_that_make_no_sense_stop_start_up(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(ApiSettings, {**SECRET, **env})
    assert named in str(err.value)


def test_rollup_retention_comes_from_its_variables() -> None:
    settings = load_settings(
        ApiSettings,
        {
            **SECRET,
            "IOT_TELEMETRY_RETENTION_DAYS": "7",
            "IOT_ROLLUP_RETENTION_DAYS_MINUTE": "7",
            "IOT_ROLLUP_RETENTION_DAYS_HOUR": "90",
            "IOT_ROLLUP_RETENTION_DAYS_DAY": "1000",
        },
    )
    assert settings.rollup_retention() == RollupRetention(7, 90, 1000)
    assert ApiSettings(jwt_secret=SECRET["IOT_JWT_SECRET"]).rollup_retention() == RollupRetention(
        30, 400, 3650
    )
