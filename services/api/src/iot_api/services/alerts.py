"""Alert rules and alerts.

Rules are written here and evaluated by the ingest service from its own cache; every change is followed by
a message on ``{prefix}:rules-changed`` so that each ingest replica reloads them. Alerts are opened and
resolved by ingest; the API lists them and records acknowledgements, which it publishes as an ``alert``
event on the device's channel so that dashboards update.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from iot_api.events import EventPublisher
from iot_api.pagination import decode_time_position, encode_cursor
from iot_api.problems import Forbidden, NotFound, invalid
from iot_api.repositories.alerts import AlertRepository, AlertRuleRepository
from iot_api.schemas import (
    Alert,
    AlertPage,
    AlertRule,
    AlertRuleCreate,
    AlertRulePage,
    AlertRuleUpdate,
    CommandAction,
    WebhookAction,
    WebhookActionView,
)
from iot_api.services.devices import check_json
from iot_common.alerts import alert_event
from iot_common.auth import Principal

WEBHOOK_RULE_NEEDS_ADMIN = "changing or deleting a rule with a webhook action needs the 'admin' scope"


def parse_id(value: str, what: str) -> uuid.UUID:
    """The UUID in a path; an id that is not one names nothing, hence 404."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"{what} {value!r} not found") from None


def _check_action(values: dict[str, Any]) -> None:
    action = values.get("action")
    if isinstance(action, CommandAction):
        check_json(action.params, "action.params")


def _check_target(device_id: str | None, device_type: str | None) -> None:
    if (device_id is None) == (device_type is None):
        raise invalid("device_id", "give exactly one of device_id and device_type", "body")


class AlertRuleService:
    def __init__(self, repo: AlertRuleRepository, events: EventPublisher) -> None:
        self.repo = repo
        self.events = events

    async def get(self, rule_id: str) -> AlertRule:
        rule = await self.repo.get(parse_id(rule_id, "alert rule"))
        if rule is None:
            raise NotFound(f"alert rule {rule_id!r} not found")
        return rule

    async def list(
        self,
        *,
        limit: int,
        cursor: str | None,
        device_id: str | None,
        device_type: str | None,
        enabled: bool | None,
    ) -> AlertRulePage:
        rows = await self.repo.list(
            device_id=device_id,
            device_type=device_type,
            enabled=enabled,
            after=decode_time_position(cursor),
            limit=limit + 1,
        )
        items = rows[:limit]
        has_more = len(rows) > limit
        last = items[-1] if items else None
        return AlertRulePage(
            items=items,
            has_more=has_more,
            next_cursor=encode_cursor(last.created_at, last.id) if has_more and last else None,
        )

    async def create(self, data: AlertRuleCreate) -> AlertRule:
        _check_target(data.device_id, data.device_type)
        values = msgspec.structs.asdict(data)
        _check_action(values)
        if isinstance(data.action, WebhookAction) and data.action.headers is msgspec.UNSET:
            values["action"] = msgspec.structs.replace(data.action, headers={})
        try:
            rule = await self.repo.create(_columns(values))
        except asyncpg.ForeignKeyViolationError:
            raise invalid("device_id", "no device with this id", "body") from None
        await self.events.rules_changed(rule.id, "created")
        return rule

    async def update(self, rule_id: str, data: AlertRuleUpdate, principal: Principal) -> AlertRule:
        """Change the given fields. A rule with a webhook action, before or after, takes the admin scope
        (the webhook carries its owner's secret headers); a webhook without ``headers`` keeps the stored ones.
        """
        current = await self.get(rule_id)
        changes = {
            f: getattr(data, f) for f in data.__struct_fields__ if getattr(data, f) is not msgspec.UNSET
        }
        action = changes.get("action")
        is_admin = principal.allows("admin")
        if not is_admin and (
            isinstance(current.action, WebhookActionView) or isinstance(action, WebhookAction)
        ):
            raise Forbidden(WEBHOOK_RULE_NEEDS_ADMIN)
        if not changes:
            return current
        _check_target(
            changes.get("device_id", current.device_id), changes.get("device_type", current.device_type)
        )
        _check_action(changes)
        if isinstance(action, WebhookAction) and action.headers is msgspec.UNSET:
            stored = await self.repo.stored_action(uuid.UUID(current.id))
            kept = stored.get("headers") if stored and stored.get("type") == "webhook" else None
            changes["action"] = msgspec.structs.replace(action, headers=kept or {})
        try:
            rule = await self.repo.update(uuid.UUID(current.id), _columns(changes), webhook_allowed=is_admin)
        except asyncpg.ForeignKeyViolationError:
            raise invalid("device_id", "no device with this id", "body") from None
        if rule is None:
            await self.get(rule_id)  # 404 when it is gone; else a webhook was set meanwhile
            raise Forbidden(WEBHOOK_RULE_NEEDS_ADMIN)
        await self.events.rules_changed(rule.id, "updated")
        return rule

    async def delete(self, rule_id: str, principal: Principal) -> None:
        """Delete the rule; one with a webhook action takes the admin scope."""
        if not await self.repo.delete(
            parse_id(rule_id, "alert rule"), webhook_allowed=principal.allows("admin")
        ):
            await self.get(rule_id)  # 404 when there is no such rule
            raise Forbidden(WEBHOOK_RULE_NEEDS_ADMIN)
        await self.events.rules_changed(rule_id, "deleted")


def _columns(values: dict[str, Any]) -> dict[str, Any]:
    """Column values: the action as its JSON form (with its ``type`` tag) for the jsonb column."""
    if "action" in values and values["action"] is not None:
        values = {**values, "action": msgspec.to_builtins(values["action"])}
    return values


class AlertService:
    def __init__(self, repo: AlertRepository, events: EventPublisher) -> None:
        self.repo = repo
        self.events = events

    async def get(self, alert_id: str) -> Alert:
        alert = await self.repo.get(parse_id(alert_id, "alert"))
        if alert is None:
            raise NotFound(f"alert {alert_id!r} not found")
        return alert

    async def list(
        self,
        *,
        limit: int,
        cursor: str | None,
        device_id: str | None,
        state: str | None,
        severity: str | None,
        start: datetime | None,
        end: datetime | None,
    ) -> AlertPage:
        rows = await self.repo.list(
            device_id=device_id,
            state=state,
            severity=severity,
            start=start,
            end=end,
            after=decode_time_position(cursor),
            limit=limit + 1,
        )
        items = rows[:limit]
        has_more = len(rows) > limit
        last = items[-1] if items else None
        return AlertPage(
            items=items,
            has_more=has_more,
            next_cursor=encode_cursor(last.opened_at, last.id) if has_more and last else None,
        )

    async def ack(self, alert_id: str, principal: str) -> Alert:
        """Acknowledge the alert; acknowledging it again changes nothing and publishes nothing."""
        result = await self.repo.ack(parse_id(alert_id, "alert"), principal)
        if result is None:
            raise NotFound(f"alert {alert_id!r} not found")
        alert, changed = result
        if changed:
            await self.events.device_event(alert.device_id, alert_event(msgspec.structs.asdict(alert)))
        return alert
