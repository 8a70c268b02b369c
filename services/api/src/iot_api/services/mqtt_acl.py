"""Who may publish or subscribe to what, for the EMQX authorisation hook.

The same rules Mosquitto enforces through its dynamic-security roles: a device's role comes from
``iot_api.dynsec.device_acls``, the service roles mirror ``deploy/mosquitto/dynsec-init.sh``.
"""

from __future__ import annotations

from typing import Literal

from iot_common.topics import (
    command_ack_topic,
    command_topic,
    state_desired_topic,
    state_reported_topic,
    status_topic,
    telemetry_topic,
)

Action = Literal["publish", "subscribe"]
Rule = tuple[Action, str]

SERVICE_ROLES: dict[str, tuple[Rule, ...]] = {
    "ingest": (
        ("subscribe", "$share/+/devices/telemetry/+"),
        ("subscribe", "$share/+/devices/status/+"),
        ("subscribe", "$share/+/devices/commands/+/ack"),
        ("subscribe", "devices/telemetry/+"),
        ("subscribe", "devices/status/+"),
        ("subscribe", "devices/commands/+/ack"),
        ("subscribe", "$share/+/devices/state/+/reported"),
        ("subscribe", "devices/state/+/reported"),
        # Commands of alert-rule actions; desired state again when a device comes online.
        ("publish", "devices/commands/+"),
        ("publish", "devices/state/+/desired"),
    ),
    "api": (
        ("publish", "devices/commands/+"),
        ("publish", "devices/state/+/desired"),
        ("subscribe", "$share/+/devices/commands/+/ack"),
        ("subscribe", "devices/commands/+/ack"),
    ),
    "sim": (
        ("publish", "devices/telemetry/+"),
        ("publish", "devices/status/+"),
        ("publish", "devices/commands/+/ack"),
        ("subscribe", "devices/commands/+"),
        ("publish", "devices/state/+/reported"),
        ("subscribe", "devices/state/+/desired"),
    ),
}
"""Platform service roles (``IOT_MQTT_SERVICE_USERS`` names one per user)."""

RESERVED_USERNAMES = frozenset({"admin", *SERVICE_ROLES})
"""MQTT user names of the platform itself: no device may take one (it would take that user's rights)."""


def covers(pattern: str, topic: str) -> bool:
    """Whether the ACL ``pattern`` covers ``topic`` (a topic name, or a filter being subscribed).

    ``+`` in the pattern stands for any one level, ``#`` for the rest; a wildcard in ``topic`` is only
    covered by the same or a wider wildcard, so a device cannot subscribe to ``devices/commands/#``.
    """
    want = pattern.split("/")
    have = topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have):
            return False
        if level == "+":
            if have[i] == "#":
                return False
            continue
        if level != have[i]:
            return False
    return len(want) == len(have)


def device_rules(device_id: str) -> tuple[Rule, ...]:
    """A device may publish its telemetry, status, command answers and state reports, and subscribe to
    its commands and its desired state."""
    return (
        ("publish", telemetry_topic(device_id)),
        ("publish", status_topic(device_id)),
        ("publish", command_ack_topic(device_id)),
        ("publish", state_reported_topic(device_id)),
        ("subscribe", command_topic(device_id)),
        ("subscribe", state_desired_topic(device_id)),
    )


def allowed(rules: tuple[Rule, ...], action: str, topic: str, literal: bool = False) -> bool:
    """Whether one of ``rules`` lets ``action`` on ``topic``; ``literal`` compares topics exactly."""
    for rule_action, pattern in rules:
        if rule_action != action:
            continue
        if pattern == topic if literal else covers(pattern, topic):
            return True
    return False
