from __future__ import annotations

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


def test_redis_names_carry_the_deployment_prefix() -> None:
    names = topics.RedisNames()  # IOT_REDIS_PREFIX's default
    assert names.device_channel("dev-1") == "iot:device:dev-1"
    assert names.device_pattern == "iot:device:*"
    assert names.latest_key("dev-1") == "iot:latest:dev-1"
    assert names.rules_changed == "iot:rules-changed"
    assert names.alert_sync == "iot:ingest:alert-sync"
    assert names.realtime_control_prefix == "iot:realtime:"
    assert names.api_cache_namespace == "iot:api:"
    assert names.device_id_from_channel(names.device_channel("dev-1")) == "dev-1"
    other = topics.RedisNames("staging")
    assert other.device_channel("dev-1") == "staging:device:dev-1"
    assert other.device_pattern == "staging:device:*"
    assert other.latest_key("dev-1") == "staging:latest:dev-1"
    assert (other.rules_changed, other.alert_sync) == ("staging:rules-changed", "staging:ingest:alert-sync")
    # One deployment's channels are never another's, not even when one prefix starts the other.
    assert other.device_id_from_channel(names.device_channel("dev-1")) is None
    assert topics.RedisNames("io").device_id_from_channel(names.device_channel("dev-1")) is None
    assert names.device_id_from_channel(topics.RedisNames("iot.b").device_channel("dev-1")) is None


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
