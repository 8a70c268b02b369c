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
    assert topics.device_id_from_channel(topics.device_channel("dev-1")) == "dev-1"


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
