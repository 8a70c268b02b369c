"""Alert rules (the conditions ingest evaluates, with their actions) and the alerts they opened.

A rule's fields, their limits and the action shapes are ingest's too: they are declared once in
:mod:`iot_common.alerts`; this module adds what only the API has (updates, responses, pages).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from iot_api.schemas.common import Page
from iot_common.alerts import (
    Action,
    AlertRuleDefinition,
    CommandAction,
    ForSeconds,
    Hysteresis,
    Op,
    RuleMessage,
    RuleName,
    Threshold,
)
from iot_common.messages import AlertState, MetricName, Severity
from iot_common.topics import DeviceId, DeviceType


class WebhookActionView(msgspec.Struct, frozen=True, tag="webhook", tag_field="type"):
    """A webhook action as responses show it: the names of its headers, never their values."""

    url: str
    header_names: list[str]
    on: list[Literal["open", "resolve"]]


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


class AlertRuleCreate(AlertRuleDefinition, frozen=True, forbid_unknown_fields=True):
    """A new rule; exactly one of ``device_id`` and ``device_type`` is given."""


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
    ack_note: str | None = None
    """What the operator wrote when acknowledging it (``POST .../ack`` with ``{"note": ...}``)."""


class AlertAck(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The optional body of ``POST /api/v1/alerts/{id}/ack``."""

    note: Annotated[str, msgspec.Meta(max_length=500, pattern=r"^[^\x00]*$")] | None = None


class AlertPage(Page, frozen=True):
    items: list[Alert]
