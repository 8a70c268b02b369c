from __future__ import annotations

import fnmatch

import pytest

from iot_common import topics


def test_topics_and_channels_are_built_from_the_device_id() -> None:
    assert topics.telemetry_topic("dev-1") == "devices/telemetry/dev-1"
    assert topics.status_topic("dev-1") == "devices/status/dev-1"
    assert topics.command_topic("dev-1") == "devices/commands/dev-1"
    assert topics.command_ack_topic("dev-1") == "devices/commands/dev-1/ack"
    assert topics.shared_subscription("ingest", topics.TELEMETRY_FILTER) == (
        "$share/ingest/devices/telemetry/+"
    )


T1 = "00000000-0000-0000-0000-000000000001"
T2 = "7d3f0a9e-2b1c-4e5f-8a6b-9c0d1e2f3a4b"


def test_redis_names_carry_the_deployment_prefix() -> None:
    names = topics.RedisNames()  # IOT_REDIS_PREFIX's default
    assert names.device_channel(T1, "dev-1") == f"iot:tenant:{T1}:device:dev-1"
    assert names.tenant_device_pattern(T1) == f"iot:tenant:{T1}:device:*"
    assert names.latest_key("dev-1") == "iot:latest:dev-1"
    assert names.rules_changed == "iot:rules-changed"
    assert names.alert_sync == "iot:ingest:alert-sync"
    assert names.realtime_control_prefix == "iot:realtime:"
    assert names.api_cache_namespace == "iot:api:"
    assert names.tenant_rate_key(T1, 1773144000) == f"iot:ingest:tenant-rate:{T1}:1773144000"
    # Device ids may hold ":" (even ":device:"): the tenant id, a UUID, holds none.
    assert names.parse_device_channel(names.device_channel(T1, "dev-1")) == (T1, "dev-1")
    assert names.parse_device_channel(names.device_channel(T2, "a:device:b")) == (T2, "a:device:b")
    other = topics.RedisNames("staging")
    assert other.device_channel(T1, "dev-1") == f"staging:tenant:{T1}:device:dev-1"
    assert other.latest_key("dev-1") == "staging:latest:dev-1"
    assert (other.rules_changed, other.alert_sync) == ("staging:rules-changed", "staging:ingest:alert-sync")
    # One deployment's channels are never another's, not even when one prefix starts the other.
    assert other.parse_device_channel(names.device_channel(T1, "dev-1")) is None
    assert topics.RedisNames("io").parse_device_channel(names.device_channel(T1, "dev-1")) is None
    assert names.parse_device_channel(topics.RedisNames("iot.b").device_channel(T1, "dev-1")) is None
    assert names.parse_device_channel(f"iot:tenant:{T1}") is None


def test_a_tenant_pattern_matches_that_tenant_s_device_channels_only() -> None:
    names = topics.RedisNames()
    pattern = names.tenant_device_pattern(T1)
    assert fnmatch.fnmatchcase(names.device_channel(T1, "a:b.c-d_e"), pattern)
    assert not fnmatch.fnmatchcase(names.device_channel(T2, "dev-1"), pattern)
    assert not fnmatch.fnmatchcase(topics.RedisNames("iot2").device_channel(T1, "dev-1"), pattern)


@pytest.mark.parametrize("prefix", ["", "a:b", "iot*", "a?", "[ab]", "x" * 33, "iot\n", "sp ace"])
def test_a_redis_prefix_with_separators_or_glob_characters_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="invalid Redis prefix"):
        topics.RedisNames(prefix)


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("devices/telemetry/dev-1", "dev-1"),
        ("devices/telemetry/sensor_01.kitchen:a", "sensor_01.kitchen:a"),
        ("devices/telemetry/", None),
        ("devices/telemetry/a/b", None),
        ("devices/status/dev-1", None),
        ("devices/telemetry/-starts-with-dash", None),
        ("devices/telemetry/" + "x" * 65, None),
    ],
)
def test_device_id_from_telemetry_topic(topic: str, expected: str | None) -> None:
    assert topics.device_id_from_topic(topic, topics.TELEMETRY_PREFIX) == expected


def test_device_id_from_command_ack_topic() -> None:
    topic = topics.command_ack_topic("dev-9")
    assert topics.device_id_from_topic(topic, topics.COMMAND_PREFIX, topics.COMMAND_ACK_SUFFIX) == "dev-9"
    assert topics.device_id_from_topic("devices/commands/dev-9", topics.COMMAND_PREFIX, "/ack") is None
