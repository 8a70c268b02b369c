"""Alert rules' actions and alert rows as events: shared by the API and ingest.

Ingest reads a rule's stored ``action`` with :func:`parse_action` (the API validates it with its own
request types before storing it); both services build the event of an alert row with
:func:`alert_event`. The API announces each rule change on ``RedisNames.rules_changed``; ingest then
reloads its rule cache. See docs/alerts.md for the semantics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

import msgspec

from iot_common.messages import AlertEvent

Trigger = Literal["open", "resolve"]
HeaderName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}(?!\n)$")]


class WebhookAction(msgspec.Struct, frozen=True, tag="webhook", tag_field="type", forbid_unknown_fields=True):
    """POST the alert as JSON to ``url`` (timeout, retries with backoff; outcome in ``action_runs``)."""

    url: Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s]+(?!\n)$", max_length=2048)]
    headers: dict[HeaderName, Annotated[str, msgspec.Meta(max_length=4096)]] = msgspec.field(
        default_factory=dict
    )
    on: list[Trigger] = msgspec.field(default_factory=lambda: ["open"])


class CommandAction(msgspec.Struct, frozen=True, tag="command", tag_field="type", forbid_unknown_fields=True):
    """Send the command ``name`` with ``params`` to the device whose reading opened the alert."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    expires_s: Annotated[int, msgspec.Meta(ge=1, le=7 * 86400)] | None = None
    on: list[Trigger] = msgspec.field(default_factory=lambda: ["open"])


Action = WebhookAction | CommandAction
"""The shapes of ``alert_rules.action`` (tagged by ``type``)."""

ALERT_COLUMNS: Final = (
    "id::text AS id, rule_id::text AS rule_id, device_id, metric, severity, state, message, value, "
    "threshold, opened_at, resolved_at, acked_at"
)
"""Columns of ``alerts`` that :func:`alert_event` reads (ids as text)."""


class InvalidAction(ValueError):
    """An ``action`` document that is none of the shapes of :data:`Action`."""


def parse_action(document: Mapping[str, Any] | None) -> Action | None:
    """Validate an ``action`` jsonb document (None: the rule has no action)."""
    if document is None:
        return None
    try:
        action: Action = msgspec.convert(document, Action)
    except msgspec.ValidationError as exc:
        raise InvalidAction(str(exc)) from None
    return action


def alert_event(record: Mapping[str, Any]) -> AlertEvent:
    """The Redis/WebSocket event for a row with :data:`ALERT_COLUMNS`."""
    return AlertEvent(**{name: record[name] for name in AlertEvent.__struct_fields__})
