"""The alert-rule contract of the API (which validates and stores rules) and ingest (which loads and runs
them): the rule's fields and their limits, the action shapes, alert rows as events, the rules-changed signal.

Declared once here, so that what the API accepts is exactly what ingest loads: the API decodes request
bodies into :class:`AlertRuleDefinition` and its actions, ingest checks each stored ``action`` with
:func:`parse_action`. Any change to ``alert_rules`` is followed by a message on ``{prefix}:rules-changed``
(the API's ``EventPublisher.rules_changed``); ingest reloads its rule cache then. See
docs/alerts.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

import msgspec

from iot_common.commands import CommandName, CommandTtl
from iot_common.db.jsonb import unstorable_json
from iot_common.messages import AlertEvent, MetricName, Severity
from iot_common.topics import DeviceId, DeviceType

Op = Literal[">", ">=", "<", "<=", "==", "!="]
Trigger = Literal["open", "resolve"]

_NO_NUL = r"^[^\x00]*$"
RuleName = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=_NO_NUL)]
RuleMessage = Annotated[str, msgspec.Meta(max_length=1000, pattern=_NO_NUL)]
Threshold = Annotated[float, msgspec.Meta(ge=-1e300, le=1e300)]
ForSeconds = Annotated[int, msgspec.Meta(ge=0, le=7 * 86400, description="Minimum duration, 0-604800 s")]
Hysteresis = Annotated[float, msgspec.Meta(ge=0, le=1e300)]

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
WebhookHeaders = Annotated[dict[HeaderName, HeaderValue], msgspec.Meta(max_length=50)]
Triggers = Annotated[
    list[Trigger],
    msgspec.Meta(min_length=1, max_length=2, description="When the action runs: the alert opens, resolves"),
]


class CommandAction(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="command", tag_field="type"):
    """Send the command ``name`` with ``params`` to the device whose reading opened (resolved) the alert;
    it expires after ``expires_s`` (default: the ingest service's ``IOT_INGEST_COMMAND_TTL_S``)."""

    name: CommandName
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    expires_s: CommandTtl | None = None
    on: Triggers = msgspec.field(default_factory=lambda: ["open"])


class WebhookAction(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="webhook", tag_field="type"):
    """POST the alert as JSON to ``url`` with the extra ``headers``.

    ``headers`` are write-only: responses show their names only (``header_names``). Left out of an update,
    the rule keeps the headers it has; ``{}`` removes them."""

    url: WebhookUrl
    given_headers: WebhookHeaders | msgspec.UnsetType = msgspec.field(name="headers", default=msgspec.UNSET)
    """``headers`` as written: UNSET when left out (the API then keeps the stored ones)."""
    on: Triggers = msgspec.field(default_factory=lambda: ["open"])

    @property
    def headers(self) -> dict[str, str]:
        """The extra request headers the webhook sends (none when ``headers`` was left out)."""
        return {} if isinstance(self.given_headers, msgspec.UnsetType) else self.given_headers


Action = CommandAction | WebhookAction
"""The shapes of ``alert_rules.action`` (tagged by ``type``)."""


class AlertRuleDefinition(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A condition on a metric of one device (``device_id``) or of each device of a type (``device_type``):
    exactly one of the two is given (:func:`has_one_target`)."""

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


ONE_TARGET: Final = "give exactly one of device_id and device_type"


def has_one_target(device_id: str | None, device_type: str | None) -> bool:
    """Whether a rule names exactly one of a device and a device type (the table's CHECK says the same)."""
    return (device_id is None) != (device_type is None)


ALERT_COLUMNS: Final = (
    "id::text AS id, rule_id::text AS rule_id, device_id, metric, severity, state, message, value, "
    "threshold, opened_at, resolved_at, acked_at"
)
"""Columns of ``alerts`` that :func:`alert_event` reads (ids as text)."""


class InvalidAction(ValueError):
    """An ``action`` document that is none of the shapes of :data:`Action`."""


def parse_action(document: Mapping[str, Any] | None) -> Action | None:
    """Validate an ``action`` jsonb document (None: the rule has no action) as the API validates a request
    body (Litestar converts JSON with ``strict=False``: a number in a string is taken)."""
    if document is None:
        return None
    try:
        action: Action = msgspec.convert(document, Action, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidAction(str(exc)) from None
    if isinstance(action, CommandAction) and (problem := unstorable_json(action.params, "params")):
        raise InvalidAction(f"{problem[1]} - at `$.{problem[0]}`")
    return action


def alert_event(record: Mapping[str, Any]) -> AlertEvent:
    """The Redis/WebSocket event for a row with :data:`ALERT_COLUMNS`."""
    return AlertEvent(**{name: record[name] for name in AlertEvent.__struct_fields__})
