"""MQTT topics and Redis key and channel names, in one place for every service."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Annotated

import msgspec

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}(?!\n)$"
"""Device ids: 1-64 characters, letters, digits and ``_ . : -``, starting with a letter or digit.

They never contain MQTT wildcards or ``/``, so an id is always exactly one topic level.

Every validation pattern ends with ``(?!\\n)$``: Python's ``$`` (msgspec ``Meta(pattern=)``,
``re.match``) also matches before a trailing newline, so ``^x$`` would accept ``"x\\n"``. ``\\Z`` is not
used because the patterns are shown in the OpenAPI document, where ECMA-262 reads ``\\Z`` as a literal ``Z``.
"""
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)
DEVICE_TYPE_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}(?!\n)$"
"""Device types: 1-64 letters, digits and ``_ . : -``."""

DeviceId = Annotated[
    str,
    msgspec.Meta(
        pattern=DEVICE_ID_PATTERN,
        description="1-64 characters: letters, digits and `_ . : -`, starting with a letter or digit",
        examples=["sensor-001"],
    ),
]
DeviceType = Annotated[str, msgspec.Meta(pattern=DEVICE_TYPE_PATTERN, examples=["thermometer"])]

TELEMETRY_PREFIX = "devices/telemetry/"
STATUS_PREFIX = "devices/status/"
COMMAND_PREFIX = "devices/commands/"
COMMAND_ACK_SUFFIX = "/ack"
STATE_PREFIX = "devices/state/"
STATE_DESIRED_SUFFIX = "/desired"
STATE_REPORTED_SUFFIX = "/reported"

TELEMETRY_FILTER = TELEMETRY_PREFIX + "+"
STATUS_FILTER = STATUS_PREFIX + "+"
COMMAND_ACK_FILTER = COMMAND_PREFIX + "+" + COMMAND_ACK_SUFFIX
STATE_REPORTED_FILTER = STATE_PREFIX + "+" + STATE_REPORTED_SUFFIX

REDIS_PREFIX_PATTERN = r"\A[A-Za-z0-9_.-]{1,32}\Z"
"""``IOT_REDIS_PREFIX``: no ``:`` (so one prefix never starts another's names) and no glob character
(``* ? [ ] \\``), so the prefix is taken literally in a ``PSUBSCRIBE`` pattern."""
DEFAULT_REDIS_PREFIX = "iot"
_REDIS_PREFIX_RE = re.compile(REDIS_PREFIX_PATTERN)


def is_valid_device_id(device_id: str) -> bool:
    """Whether ``device_id`` matches :data:`DEVICE_ID_PATTERN` in full (a trailing newline included)."""
    return _DEVICE_ID_RE.fullmatch(device_id) is not None


def telemetry_topic(device_id: str) -> str:
    return TELEMETRY_PREFIX + device_id


def status_topic(device_id: str) -> str:
    return STATUS_PREFIX + device_id


def command_topic(device_id: str) -> str:
    return COMMAND_PREFIX + device_id


def command_ack_topic(device_id: str) -> str:
    return COMMAND_PREFIX + device_id + COMMAND_ACK_SUFFIX


def state_desired_topic(device_id: str) -> str:
    """Where a device receives its desired state (retained, QoS 1)."""
    return STATE_PREFIX + device_id + STATE_DESIRED_SUFFIX


def state_reported_topic(device_id: str) -> str:
    """Where a device reports its state (QoS 1), read by ingest."""
    return STATE_PREFIX + device_id + STATE_REPORTED_SUFFIX


def shared_subscription(group: str, topic_filter: str) -> str:
    """An MQTT 5 shared subscription: replicas in ``group`` split the messages of ``topic_filter``."""
    return f"$share/{group}/{topic_filter}"


def device_id_from_topic(topic: str, prefix: str, suffix: str = "") -> str | None:
    """The device id in ``prefix{id}suffix``, or None when the topic does not have that shape."""
    if not topic.startswith(prefix) or not topic.endswith(suffix):
        return None
    device_id = topic[len(prefix) : len(topic) - len(suffix)]
    return device_id if is_valid_device_id(device_id) else None


@dataclass(frozen=True, slots=True)
class RedisNames:
    """Every Redis key and channel name of one deployment, under its ``IOT_REDIS_PREFIX``.

    Redis pub/sub ignores the database number, so deployments sharing a Redis server are told apart by
    this prefix alone. Each service builds one from its settings (``settings.redis_names()``) and hands
    it to whatever talks to Redis.
    """

    prefix: str = DEFAULT_REDIS_PREFIX
    _tenant: str = field(init=False, repr=False, compare=False)
    _latest: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if _REDIS_PREFIX_RE.match(self.prefix) is None:
            raise ValueError(f"invalid Redis prefix {self.prefix!r}: expected {REDIS_PREFIX_PATTERN}")
        object.__setattr__(self, "_tenant", f"{self.prefix}:tenant:")
        object.__setattr__(self, "_latest", f"{self.prefix}:latest:")

    def device_channel(self, tenant_id: str | uuid.UUID, device_id: str) -> str:
        """Pub/sub channel carrying every event of one device (telemetry, status, alert, command), under
        the tenant that owns the device: ``{prefix}:tenant:{tenant_id}:device:{device_id}``."""
        return f"{self._tenant}{tenant_id}:device:{device_id}"

    def tenant_device_pattern(self, tenant_id: str | uuid.UUID) -> str:
        """``PSUBSCRIBE`` pattern of every device channel of one tenant (tenant ids are UUIDs, device ids
        hold no glob character, so the pattern matches exactly that tenant's channels)."""
        return f"{self._tenant}{tenant_id}:device:*"

    def tenant_channel(self, tenant_id: str | uuid.UUID) -> str:
        """Sharded pub/sub channel carrying every device event of one tenant, published beside the device
        channel in Redis Cluster mode only: sharded pub/sub has no patterns, so the ``"*"`` subscribers of
        a tenant ``SSUBSCRIBE`` this instead of ``PSUBSCRIBE`` :meth:`tenant_device_pattern`."""
        return f"{self._tenant}{tenant_id}:devices"

    def parse_device_channel(self, channel: str) -> tuple[str, str] | None:
        """(tenant id, device id) of one of this deployment's device channels, else None."""
        if not channel.startswith(self._tenant):
            return None
        tenant_id, sep, device_id = channel[len(self._tenant) :].partition(":device:")
        if not sep or not tenant_id or not device_id:
            return None
        return tenant_id, device_id

    def tenant_rate_key(self, tenant_id: str, second: int) -> str:
        """Counter of the readings ingest accepted from one tenant's devices in one second (epoch
        seconds), shared by the ingest replicas to enforce ``tenants.max_readings_per_s``."""
        return f"{self.prefix}:ingest:tenant-rate:{tenant_id}:{second}"

    def latest_key(self, device_id: str) -> str:
        """Hash of a device's latest values: field = metric, value = encoded ``LatestValue``."""
        return self._latest + device_id

    def state_key(self, device_id: str) -> str:
        """A copy of a device's current state (an encoded ``StateEvent``), written after each commit by
        whoever changed it, never to an older version: what realtime's ``latest`` frame includes."""
        return f"{self.prefix}:state:{device_id}"

    @property
    def rules_changed(self) -> str:
        """Channel on which a change of the alert rules is announced (ingest reloads them)."""
        return f"{self.prefix}:rules-changed"

    @property
    def alert_sync(self) -> str:
        """Channel on which ingest replicas tell each other that an alert opened or resolved (or that a
        rule's ``for_seconds`` wait started or was reset), so that a device whose readings alternate
        between replicas is judged with one state. Internal to the ingest service."""
        return f"{self.prefix}:ingest:alert-sync"

    @property
    def ingest_members(self) -> str:
        """Sorted set of the ingest replicas' MQTT client ids, scored by their last heartbeat (Redis server
        time): who may leave the share group on shutdown, and whose session a peer adopts once it is
        silent. Internal to the ingest service."""
        return f"{self.prefix}:ingest:members"

    def ingest_adoption_lock(self, client_id: str) -> str:
        """Held by the replica adopting a silent peer's MQTT session, so that one replica does it."""
        return f"{self.prefix}:ingest:adopting:{client_id}"

    @property
    def realtime_control_prefix(self) -> str:
        """Start of each realtime process's private channel (``{prefix}:realtime:{host}:{pid}:{random}``)."""
        return f"{self.prefix}:realtime:"

    @property
    def api_cache_namespace(self) -> str:
        """Start of the API's keys (cache, sessions, rate counters) unless ``IOT_API_CACHE_NAMESPACE``."""
        return f"{self.prefix}:api:"
