"""MQTT topics and Redis key and channel names, in one place for every service."""

from __future__ import annotations

import re

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}(?!\n)$"
"""Device ids: 1-64 characters, letters, digits and ``_ . : -``, starting with a letter or digit.

They never contain MQTT wildcards or ``/``, so an id is always exactly one topic level.

Every validation pattern ends with ``(?!\\n)$``: Python's ``$`` (msgspec ``Meta(pattern=)``,
``re.match``) also matches before a trailing newline, so ``^x$`` would accept ``"x\\n"``. ``\\Z`` is not
used because the patterns are shown in the OpenAPI document, where ECMA-262 reads ``\\Z`` as a literal ``Z``.
"""
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)

TELEMETRY_PREFIX = "devices/telemetry/"
STATUS_PREFIX = "devices/status/"
COMMAND_PREFIX = "devices/commands/"
COMMAND_ACK_SUFFIX = "/ack"

TELEMETRY_FILTER = TELEMETRY_PREFIX + "+"
STATUS_FILTER = STATUS_PREFIX + "+"
COMMAND_ACK_FILTER = COMMAND_PREFIX + "+" + COMMAND_ACK_SUFFIX

REDIS_PREFIX = "iot:"
DEVICE_CHANNEL_PREFIX = REDIS_PREFIX + "device:"
DEVICE_CHANNEL_PATTERN = DEVICE_CHANNEL_PREFIX + "*"
LATEST_PREFIX = REDIS_PREFIX + "latest:"
RULES_CHANGED_CHANNEL = REDIS_PREFIX + "rules-changed"


def is_valid_device_id(device_id: str) -> bool:
    """Whether ``device_id`` matches :data:`DEVICE_ID_PATTERN`."""
    return _DEVICE_ID_RE.match(device_id) is not None


def telemetry_topic(device_id: str) -> str:
    return TELEMETRY_PREFIX + device_id


def status_topic(device_id: str) -> str:
    return STATUS_PREFIX + device_id


def command_topic(device_id: str) -> str:
    return COMMAND_PREFIX + device_id


def command_ack_topic(device_id: str) -> str:
    return COMMAND_PREFIX + device_id + COMMAND_ACK_SUFFIX


def shared_subscription(group: str, topic_filter: str) -> str:
    """An MQTT 5 shared subscription: replicas in ``group`` split the messages of ``topic_filter``."""
    return f"$share/{group}/{topic_filter}"


def device_id_from_topic(topic: str, prefix: str, suffix: str = "") -> str | None:
    """The device id in ``prefix{id}suffix``, or None when the topic does not have that shape."""
    if not topic.startswith(prefix) or not topic.endswith(suffix):
        return None
    device_id = topic[len(prefix) : len(topic) - len(suffix)]
    return device_id if is_valid_device_id(device_id) else None


def device_channel(device_id: str) -> str:
    """Redis pub/sub channel carrying every event of one device (telemetry, status, alert, command)."""
    return DEVICE_CHANNEL_PREFIX + device_id


def device_id_from_channel(channel: str) -> str | None:
    if not channel.startswith(DEVICE_CHANNEL_PREFIX):
        return None
    return channel[len(DEVICE_CHANNEL_PREFIX) :]


def latest_key(device_id: str) -> str:
    """Redis hash of a device's latest values: field = metric, value = encoded :class:`LatestValue`."""
    return LATEST_PREFIX + device_id


ALERT_SYNC_CHANNEL = REDIS_PREFIX + "ingest:alert-sync"
"""Redis channel on which ingest replicas tell each other that an alert opened or resolved (or that a
rule's ``for_seconds`` wait started or was reset), so that a device whose readings alternate between
replicas is judged with one state. Internal to the ingest service."""
