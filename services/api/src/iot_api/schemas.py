"""Request and response bodies of the API, as msgspec Structs: they validate and they are the OpenAPI."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from iot_common.messages import (
    METRIC_NAME_PATTERN,
    AlertState,
    CommandState,
    DeviceStatus,
    Severity,
)
from iot_common.topics import DEVICE_ID_PATTERN

DeviceId = Annotated[
    str,
    msgspec.Meta(
        pattern=DEVICE_ID_PATTERN,
        description="1-64 characters: letters, digits and `_ . : -`, starting with a letter or digit",
        examples=["sensor-001"],
    ),
]
MetricName = Annotated[str, msgspec.Meta(pattern=METRIC_NAME_PATTERN, examples=["temperature"])]
DeviceType = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}(?!\n)$", examples=["thermometer"])]
Text = Annotated[str, msgspec.Meta(max_length=200, pattern=r"^[^\x00]*$")]
Scope = Literal["read", "write", "admin"]
Aggregate = Literal["avg", "min", "max", "sum", "count"]


class Device(msgspec.Struct, frozen=True):
    id: str
    name: str
    type: str
    status: DeviceStatus
    attributes: dict[str, Any]
    last_seen: datetime | None
    created_at: datetime
    updated_at: datetime


class DeviceCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A new device. Without ``id`` the API generates one (``dev-`` and 16 hex digits)."""

    id: DeviceId | None = None
    name: Text = ""
    type: DeviceType = "generic"
    attributes: dict[str, Any] = msgspec.field(default_factory=dict)


class DeviceUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Fields to change; a field left out (or null) keeps its value. ``attributes`` replaces the whole map."""

    name: Text | None = None
    type: DeviceType | None = None
    status: DeviceStatus | None = None
    attributes: dict[str, Any] | None = None


class Page(msgspec.Struct, frozen=True):
    """Cursor pagination: pass ``next_cursor`` back as ``cursor`` while ``has_more`` is true."""

    has_more: bool
    next_cursor: str | None


class DevicePage(Page, frozen=True):
    items: list[Device]


class TelemetryPoint(msgspec.Struct, frozen=True):
    ts: datetime
    metric: str
    value: float | str


class TelemetryPage(Page, frozen=True, tag="raw", tag_field="kind"):
    """Raw points, newest first (``order=desc``) or oldest first (``order=asc``)."""

    device_id: str
    order: Literal["asc", "desc"]
    items: list[TelemetryPoint]


class AggregatePoint(msgspec.Struct, frozen=True, omit_defaults=True):
    """One bucket, labelled by its start; only the aggregates asked for are present."""

    ts: datetime
    avg: float | None = None
    min: float | None = None
    max: float | None = None
    sum: float | None = None
    count: int | None = None


class TelemetryAggregate(msgspec.Struct, frozen=True, tag="aggregate", tag_field="kind"):
    """Numeric values of one metric per time bucket (buckets without values are left out)."""

    device_id: str
    metric: str
    bucket: str
    agg: list[Aggregate]
    from_: datetime = msgspec.field(name="from")
    to: datetime
    points: list[AggregatePoint]


class SeriesPoint(msgspec.Struct, frozen=True, omit_defaults=True):
    """A raw point (``value``) or a bucket (the aggregates asked for)."""

    ts: datetime
    value: float | str | None = None
    avg: float | None = None
    min: float | None = None
    max: float | None = None
    sum: float | None = None
    count: int | None = None


class Series(msgspec.Struct, frozen=True):
    """``has_more``: the device has more points than shown; on a ``truncated`` page the last series goes
    on in the next page, otherwise the range holds more than ``limit`` raw points (narrow it)."""

    device_id: str
    metric: str
    has_more: bool
    points: list[SeriesPoint]


class History(msgspec.Struct, frozen=True):
    """One series per requested device, all on the same time range and bucket.

    At most IOT_API_MAX_POINTS_PER_RESPONSE points in all: past that the page is ``truncated`` and
    ``next_cursor`` continues right after the last point (the next page starts with that device's series).
    """

    metric: str
    bucket: str | None
    from_: datetime = msgspec.field(name="from")
    to: datetime
    series: list[Series]
    truncated: bool = False
    next_cursor: str | None = None


class LatestValue(msgspec.Struct, frozen=True):
    value: float | str
    ts: datetime


class DeviceLatest(msgspec.Struct, frozen=True):
    """Latest value of every metric of a device; ``source`` says whether Redis or PostgreSQL answered."""

    device_id: str
    metrics: dict[str, LatestValue]
    source: Literal["cache", "database"]


class LatestList(msgspec.Struct, frozen=True):
    items: list[DeviceLatest]


class Reject(msgspec.Struct, frozen=True):
    id: int
    received_at: datetime
    topic: str
    device_id: str | None
    reason: str
    detail: str
    payload: str
    payload_size: int


class RejectPage(Page, frozen=True):
    items: list[Reject]


class Login(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    email: Annotated[str, msgspec.Meta(min_length=1, max_length=320, pattern=r"^[^\x00]*$")]
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=1024, pattern=r"^[^\x00]*$")]


class RefreshRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    refresh_token: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class Tokens(msgspec.Struct, frozen=True):
    """An access token (JWT, ``Authorization: Bearer``) and the refresh token that renews it.

    ``refresh_token`` is null when the session store (Redis) is unavailable: the access token still works.
    """

    access_token: str
    token_type: Literal["bearer"]
    expires_in: int
    refresh_token: str | None
    refresh_expires_in: int | None


class RealtimeToken(msgspec.Struct, frozen=True):
    """A short-lived token for the realtime service's WebSocket (``?token=``)."""

    token: str
    token_type: Literal["realtime"]
    expires_in: int


class Me(msgspec.Struct, frozen=True):
    subject: str
    kind: Literal["user", "api_key"]
    scopes: list[Scope]


class ApiKeyCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
    scopes: Annotated[list[Scope], msgspec.Meta(min_length=1, max_length=3)]


class ApiKey(msgspec.Struct, frozen=True):
    id: str
    name: str
    prefix: str
    scopes: list[Scope]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKey, frozen=True):
    """The new key; ``key`` is shown this once and never again."""

    key: str


class ApiKeyPage(msgspec.Struct, frozen=True):
    items: list[ApiKey]


# Alert rules, alerts and commands (issue 6). The ingest service evaluates the rules and opens/resolves the
# alerts; the API manages the rules, lists and acknowledges alerts, and sends commands to devices.

Op = Literal[">", ">=", "<", "<=", "==", "!="]
CommandName = Annotated[
    str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}(?!\n)$", examples=["reboot", "set_interval"])
]
WebhookUrl = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^https?://[^\s/?#@]+(:\d{1,5})?([/?#]\S*)?(?!\n)$",
        max_length=2048,
        description="http:// or https:// URL the webhook POSTs to",
        examples=["https://hooks.example.com/iot"],
    ),
]
HeaderName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}(?!\n)$")]
HeaderValue = Annotated[str, msgspec.Meta(max_length=2000, pattern=r"^[^\x00-\x1f\x7f]*(?!\n)$")]
Threshold = Annotated[float, msgspec.Meta(ge=-1e300, le=1e300)]


Triggers = Annotated[
    list[Literal["open", "resolve"]],
    msgspec.Meta(min_length=1, max_length=2, description="When the action runs: the alert opens, resolves"),
]


class CommandAction(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="command", tag_field="type"):
    """Send the command ``name`` with ``params`` to the device whose reading opened (resolved) the alert;
    it expires after ``expires_s`` (default: the ingest service's ``IOT_INGEST_COMMAND_TTL_S``)."""

    name: CommandName
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    expires_s: Annotated[int, msgspec.Meta(ge=1, le=7 * 86400)] | None = None
    on: Triggers = msgspec.field(default_factory=lambda: ["open"])


class WebhookAction(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="webhook", tag_field="type"):
    """POST the alert as JSON to ``url`` with the extra ``headers``.

    ``headers`` are write-only: responses show their names only (``header_names``). Left out of an update,
    the rule keeps the headers it has; ``{}`` removes them."""

    url: WebhookUrl
    headers: Annotated[dict[HeaderName, HeaderValue], msgspec.Meta(max_length=50)] | msgspec.UnsetType = (
        msgspec.UNSET
    )
    on: Triggers = msgspec.field(default_factory=lambda: ["open"])


class WebhookActionView(msgspec.Struct, frozen=True, tag="webhook", tag_field="type"):
    """A webhook action as responses show it: the names of its headers, never their values."""

    url: str
    header_names: list[str]
    on: list[Literal["open", "resolve"]]


Action = CommandAction | WebhookAction
"""``alert_rules.action`` as clients write it; stored as the ingest service reads it (docs/alerts.md)."""
ActionView = CommandAction | WebhookActionView


class AlertRule(msgspec.Struct, frozen=True):
    """A condition on a metric of one device (``device_id``) or of each device of a type (``device_type``)."""

    id: str
    name: str
    device_id: str | None
    device_type: str | None
    metric: str
    op: Op
    threshold: float
    for_seconds: int
    hysteresis: float
    severity: Severity
    message: str
    action: ActionView | None
    enabled: bool
    created_at: datetime
    updated_at: datetime


ForSeconds = Annotated[int, msgspec.Meta(ge=0, le=7 * 86400, description="Minimum duration, 0-604800 s")]
Hysteresis = Annotated[float, msgspec.Meta(ge=0, le=1e300)]
RuleName = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
RuleMessage = Annotated[str, msgspec.Meta(max_length=1000, pattern=r"^[^\x00]*$")]


class AlertRuleCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A new rule; exactly one of ``device_id`` and ``device_type`` is given."""

    name: RuleName
    metric: MetricName
    op: Op
    threshold: Threshold
    device_id: DeviceId | None = None
    device_type: DeviceType | None = None
    for_seconds: ForSeconds = 0
    hysteresis: Hysteresis = 0.0
    severity: Severity = "warning"
    message: RuleMessage = ""
    action: Action | None = None
    enabled: bool = True


class AlertRuleUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Fields to change; a field left out keeps its value. ``action: null`` removes the action.

    To move a rule from a device to a device type, set the one and null the other in the same request.
    """

    name: RuleName | msgspec.UnsetType = msgspec.UNSET
    metric: MetricName | msgspec.UnsetType = msgspec.UNSET
    op: Op | msgspec.UnsetType = msgspec.UNSET
    threshold: Threshold | msgspec.UnsetType = msgspec.UNSET
    device_id: DeviceId | msgspec.UnsetType | None = msgspec.UNSET
    device_type: DeviceType | msgspec.UnsetType | None = msgspec.UNSET
    for_seconds: ForSeconds | msgspec.UnsetType = msgspec.UNSET
    hysteresis: Hysteresis | msgspec.UnsetType = msgspec.UNSET
    severity: Severity | msgspec.UnsetType = msgspec.UNSET
    message: RuleMessage | msgspec.UnsetType = msgspec.UNSET
    action: Action | msgspec.UnsetType | None = msgspec.UNSET
    enabled: bool | msgspec.UnsetType = msgspec.UNSET


class AlertRulePage(Page, frozen=True):
    items: list[AlertRule]


class Alert(msgspec.Struct, frozen=True):
    """An alert opened by the ingest service when a rule's condition started holding for a device."""

    id: str
    rule_id: str
    device_id: str
    metric: str
    severity: Severity
    state: AlertState
    message: str
    value: float | None
    threshold: float
    opened_at: datetime
    resolved_at: datetime | None
    acked_at: datetime | None
    acked_by: str | None


class AlertPage(Page, frozen=True):
    items: list[Alert]


class CommandCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A command for a device; it expires ``ttl_s`` s after creation (default ``IOT_API_COMMAND_TTL_S``)."""

    name: CommandName
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    ttl_s: Annotated[int, msgspec.Meta(ge=1, le=7 * 86400)] | None = None


class Command(msgspec.Struct, frozen=True):
    """A command and its state: ``sent`` once the broker took it, ``acked``/``failed`` from the device's
    answer, ``expired`` when no answer came before ``expires_at``; ``failed`` with ``error`` also when the
    broker could not be reached."""

    id: str
    device_id: str
    name: str
    params: dict[str, Any]
    state: CommandState
    result: dict[str, Any] | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None


class CommandPage(Page, frozen=True):
    items: list[Command]
