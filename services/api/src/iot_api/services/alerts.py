"""Alert rules and alerts.

Rules are written here and evaluated by the ingest service from its own cache; every change is followed by
a message on ``{prefix}:rules-changed`` so that each ingest replica reloads them. Alerts are opened and
resolved by ingest; the API lists them and records acknowledgements, which it publishes as an ``alert``
event on the device's channel so that dashboards update.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import msgspec

from iot_api.errors import Forbidden, Invalid, NotFound
from iot_api.events import EventPublisher
from iot_api.pagination import TIME_AND_UUID, paginate
from iot_api.queries import PageRequest, TimeRange
from iot_api.repositories.alerts import AlertRepository, AlertRuleRepository
from iot_api.schemas.alerts import (
    Alert,
    AlertPage,
    AlertRule,
    AlertRuleCreate,
    AlertRulePage,
    AlertRuleUpdate,
    WebhookActionView,
)
from iot_api.services.devices import check_json
from iot_api.tenancy import TenantScope
from iot_common.alerts import ONE_TARGET, CommandAction, WebhookAction, alert_event, has_one_target

WEBHOOK_NEEDS_ADMIN = "a webhook action needs the 'admin' permission"
WEBHOOK_RULE_NEEDS_ADMIN = "changing or deleting a rule with a webhook action needs the 'admin' permission"
NO_SUCH_DEVICE = "no device with this id"


def rule_columns(values: dict[str, Any], device_id: str | None, device_type: str | None) -> dict[str, Any]:
    """The columns to store for a new or changed rule (``values``: its given fields; ``device_id`` and
    ``device_type``: the rule's target after the change); :class:`Invalid` for what validation of the
    body alone cannot see. The action is stored in its JSON form, with its ``type`` tag."""
    if not has_one_target(device_id, device_type):
        raise Invalid("device_id", ONE_TARGET, "body")
    action = values.get("action")
    if isinstance(action, CommandAction):
        check_json(action.params, "action.params")
    if action is not None:
        values = {**values, "action": msgspec.to_builtins(action)}
    return values


def new_rule_columns(data: AlertRuleCreate) -> dict[str, Any]:
    """The columns of a new rule (a webhook left without ``headers`` gets none), as ingest will load them."""
    values = msgspec.structs.asdict(data)
    if isinstance(data.action, WebhookAction) and data.action.given_headers is msgspec.UNSET:
        values["action"] = msgspec.structs.replace(data.action, given_headers={})
    return rule_columns(values, data.device_id, data.device_type)


class AlertRuleService:
    def __init__(self, repo: AlertRuleRepository, events: EventPublisher) -> None:
        self.repo = repo
        self.events = events

    async def get(self, tenant: TenantScope, rule_id: uuid.UUID) -> AlertRule:
        rule = await self.repo.get(tenant.tenant_id, rule_id)
        if rule is None:
            raise NotFound(f"alert rule '{rule_id}' not found")
        return rule

    async def list(
        self,
        tenant: TenantScope,
        page: PageRequest,
        *,
        device_id: str | None,
        device_type: str | None,
        enabled: bool | None,
    ) -> AlertRulePage:
        return await paginate(
            AlertRulePage,
            page,
            TIME_AND_UUID,
            lambda after, n: self.repo.list(
                tenant.tenant_id,
                device_id=device_id,
                device_type=device_type,
                enabled=enabled,
                after=after,
                limit=n,
            ),
            lambda rule: (rule.created_at, rule.id),
        )

    async def create(self, tenant: TenantScope, data: AlertRuleCreate) -> AlertRule:
        """Store a new rule of the tenant (on one of its devices, or on a device type: its devices of that
        type); a webhook action takes the admin permission (it makes ingest POST anywhere)."""
        if isinstance(data.action, WebhookAction) and not tenant.allows("admin"):
            raise Forbidden(WEBHOOK_NEEDS_ADMIN)
        try:
            rule = await self.repo.create(tenant.tenant_id, new_rule_columns(data))
        except asyncpg.ForeignKeyViolationError:
            raise Invalid("device_id", NO_SUCH_DEVICE, "body") from None
        await self.events.rules_changed(rule.id, "created")
        return rule

    async def update(self, tenant: TenantScope, rule_id: uuid.UUID, data: AlertRuleUpdate) -> AlertRule:
        """Change the given fields. A rule with a webhook action, before or after, takes the admin permission
        (the webhook carries its owner's secret headers); a webhook without ``headers`` keeps the stored ones.
        """
        current = await self.get(tenant, rule_id)
        changes = {
            f: getattr(data, f) for f in data.__struct_fields__ if getattr(data, f) is not msgspec.UNSET
        }
        action = changes.get("action")
        is_admin = tenant.allows("admin")
        if not is_admin and (
            isinstance(current.action, WebhookActionView) or isinstance(action, WebhookAction)
        ):
            raise Forbidden(WEBHOOK_RULE_NEEDS_ADMIN)
        if not changes:
            return current
        target = changes.get("device_id", current.device_id), changes.get("device_type", current.device_type)
        columns = rule_columns(changes, *target)
        if isinstance(action, WebhookAction) and action.given_headers is msgspec.UNSET:
            stored = await self.repo.stored_action(tenant.tenant_id, rule_id)
            kept = stored.get("headers") if stored and stored.get("type") == "webhook" else None
            columns["action"] = {**columns["action"], "headers": kept or {}}
        try:
            rule = await self.repo.update(tenant.tenant_id, rule_id, columns, webhook_allowed=is_admin)
        except asyncpg.ForeignKeyViolationError:
            raise Invalid("device_id", NO_SUCH_DEVICE, "body") from None
        if rule is None:
            await self.get(tenant, rule_id)  # 404 when it is gone; else a webhook was set meanwhile
            raise Forbidden(WEBHOOK_RULE_NEEDS_ADMIN)
        await self.events.rules_changed(rule.id, "updated")
        return rule

    async def delete(self, tenant: TenantScope, rule_id: uuid.UUID) -> None:
        """Delete the rule; one with a webhook action takes the admin permission."""
        if not await self.repo.delete(tenant.tenant_id, rule_id, webhook_allowed=tenant.allows("admin")):
            await self.get(tenant, rule_id)  # 404 when there is no such rule
            raise Forbidden(WEBHOOK_RULE_NEEDS_ADMIN)
        await self.events.rules_changed(str(rule_id), "deleted")


class AlertService:
    def __init__(self, repo: AlertRepository, events: EventPublisher) -> None:
        self.repo = repo
        self.events = events

    async def get(self, tenant: TenantScope, alert_id: uuid.UUID) -> Alert:
        alert = await self.repo.get(tenant.tenant_id, alert_id)
        if alert is None:
            raise NotFound(f"alert '{alert_id}' not found")
        return alert

    async def list(
        self,
        tenant: TenantScope,
        page: PageRequest,
        span: TimeRange,
        *,
        device_id: str | None,
        state: str | None,
        severity: str | None,
    ) -> AlertPage:
        """Alerts newest first by ``opened_at``, opened in ``span``."""
        opened = span.in_utc()
        return await paginate(
            AlertPage,
            page,
            TIME_AND_UUID,
            lambda after, n: self.repo.list(
                tenant.tenant_id,
                device_id=device_id,
                state=state,
                severity=severity,
                opened=opened,
                after=after,
                limit=n,
            ),
            lambda alert: (alert.opened_at, alert.id),
        )

    async def ack(self, tenant: TenantScope, alert_id: uuid.UUID, note: str | None = None) -> Alert:
        """Acknowledge the alert, with the operator's note if any; acknowledging it again changes nothing
        (the first note stays) and publishes nothing."""
        result = await self.repo.ack(tenant.tenant_id, alert_id, tenant.principal.subject, note)
        if result is None:
            raise NotFound(f"alert '{alert_id}' not found")
        alert, changed = result
        if changed:
            event = alert_event(msgspec.structs.asdict(alert))
            await self.events.device_event(tenant.tenant_id, alert.device_id, event)
        return alert
