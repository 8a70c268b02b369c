"""Alert rules (written by the API, read by ingest) and alerts (opened and resolved by ingest), of one
tenant: every statement names it."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import msgspec

from iot_api.queries import TimeRange
from iot_api.repositories.sql import Query
from iot_api.schemas.alerts import ActionView, Alert, AlertRule, WebhookActionView
from iot_common.alerts import CommandAction

_RULE_COLUMNS = (
    "id, name, device_id, device_type, metric, op, threshold, for_seconds, hysteresis, severity, message,"
    " action, enabled, created_at, updated_at"
)
_ALERT_COLUMNS = (
    "id, rule_id, device_id, metric, severity, state, message, value, threshold, opened_at, resolved_at,"
    " acked_at, acked_by, ack_note"
)


def _action_view(document: dict[str, Any] | None) -> ActionView | None:
    """The stored action as responses show it: a webhook's header names, never their values."""
    if document is None:
        return None
    if document.get("type") == "webhook":
        return WebhookActionView(
            url=document["url"],
            header_names=sorted(document.get("headers") or {}),
            on=document.get("on") or ["open"],
        )
    return msgspec.convert(document, CommandAction)


def _rule(row: asyncpg.Record) -> AlertRule:
    return AlertRule(**{**row, "id": str(row["id"]), "action": _action_view(row["action"])})


def _alert(row: asyncpg.Record) -> Alert:
    return Alert(**{**row, "id": str(row["id"]), "rule_id": str(row["rule_id"])})


# Checked in the same statement as the change, so that a webhook set meanwhile is not changed by a non-admin.
_NO_WEBHOOK_UNLESS_3 = "$3 OR action IS NULL OR action->>'type' IS DISTINCT FROM 'webhook'"


class AlertRuleRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def get(self, tenant_id: uuid.UUID, rule_id: uuid.UUID) -> AlertRule | None:
        row = await self.pool.fetchrow(
            f"SELECT {_RULE_COLUMNS} FROM alert_rules WHERE tenant_id = $1 AND id = $2", tenant_id, rule_id
        )
        return None if row is None else _rule(row)

    async def stored_action(self, tenant_id: uuid.UUID, rule_id: uuid.UUID) -> dict[str, Any] | None:
        """The rule's action as stored (a webhook's headers included): for the service, never a client."""
        action: dict[str, Any] | None = await self.pool.fetchval(
            "SELECT action FROM alert_rules WHERE tenant_id = $1 AND id = $2", tenant_id, rule_id
        )
        return action

    async def create(self, tenant_id: uuid.UUID, values: dict[str, Any]) -> AlertRule:
        """Insert a rule; raises asyncpg's ForeignKeyViolationError when ``device_id`` is not a device of
        the tenant."""
        query = Query()
        columns = {"tenant_id": tenant_id, **values}
        placeholders = ", ".join(query.arg(value) for value in columns.values())
        row = await self.pool.fetchrow(
            f"INSERT INTO alert_rules ({', '.join(columns)}) VALUES ({placeholders})"
            f" RETURNING {_RULE_COLUMNS}",
            *query.args,
        )
        assert row is not None
        return _rule(row)

    async def update(
        self,
        tenant_id: uuid.UUID,
        rule_id: uuid.UUID,
        changes: dict[str, Any],
        *,
        webhook_allowed: bool = True,
    ) -> AlertRule | None:
        """Set the given columns (names come from the service, never from the client); None when the rule
        is gone, or has a webhook action and ``webhook_allowed`` is false."""
        query = Query(tenant_id, rule_id, webhook_allowed)
        row = await self.pool.fetchrow(
            f"UPDATE alert_rules SET {query.assignments(changes)}, updated_at = now()"
            f" WHERE tenant_id = $1 AND id = $2 AND ({_NO_WEBHOOK_UNLESS_3}) RETURNING {_RULE_COLUMNS}",
            *query.args,
        )
        return None if row is None else _rule(row)

    async def delete(self, tenant_id: uuid.UUID, rule_id: uuid.UUID, *, webhook_allowed: bool = True) -> bool:
        """Delete the rule; False when it is gone, or has a webhook action and ``webhook_allowed`` is off."""
        status = await self.pool.execute(
            f"DELETE FROM alert_rules WHERE tenant_id = $1 AND id = $2 AND ({_NO_WEBHOOK_UNLESS_3})",
            tenant_id,
            rule_id,
            webhook_allowed,
        )
        return status.endswith(" 1")

    async def list(
        self,
        tenant_id: uuid.UUID,
        *,
        device_id: str | None,
        device_type: str | None,
        enabled: bool | None,
        after: tuple[Any, ...] | None,
        limit: int,
    ) -> list[AlertRule]:
        """Newest first, after the position ``after`` (created_at, id)."""
        query = Query(tenant_id)
        query.where("tenant_id = $1")
        query.equals("device_id", device_id)
        query.equals("device_type", device_type)
        query.equals("enabled", enabled)
        query.after(("created_at", "id"), after, descending=True)
        rows = await self.pool.fetch(
            f"SELECT {_RULE_COLUMNS} FROM alert_rules {query.sql()}"
            f" ORDER BY created_at DESC, id DESC LIMIT {query.arg(limit)}",
            *query.args,
        )
        return [_rule(r) for r in rows]


class AlertRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def get(self, tenant_id: uuid.UUID, alert_id: uuid.UUID) -> Alert | None:
        row = await self.pool.fetchrow(
            f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE tenant_id = $1 AND id = $2", tenant_id, alert_id
        )
        return None if row is None else _alert(row)

    async def ack(
        self, tenant_id: uuid.UUID, alert_id: uuid.UUID, principal: str, note: str | None = None
    ) -> tuple[Alert, bool] | None:
        """Acknowledge the alert unless it already is; (alert, whether this call acknowledged it)."""
        row = await self.pool.fetchrow(
            f"""
            UPDATE alerts SET acked_at = now(), acked_by = $3, ack_note = $4
            WHERE tenant_id = $1 AND id = $2 AND acked_at IS NULL RETURNING {_ALERT_COLUMNS}
            """,
            tenant_id,
            alert_id,
            principal,
            note,
        )
        if row is not None:
            return _alert(row), True
        alert = await self.get(tenant_id, alert_id)
        return None if alert is None else (alert, False)

    async def list(
        self,
        tenant_id: uuid.UUID,
        *,
        device_id: str | None,
        state: str | None,
        severity: str | None,
        opened: TimeRange,
        after: tuple[Any, ...] | None,
        limit: int,
    ) -> list[Alert]:
        """Newest first by ``opened_at``, after the position ``after`` (opened_at, id)."""
        query = Query(tenant_id)
        query.where("tenant_id = $1")
        query.equals("device_id", device_id)
        query.equals("state", state)
        query.equals("severity", severity)
        query.between("opened_at", opened.start, opened.end)
        query.after(("opened_at", "id"), after, descending=True)
        rows = await self.pool.fetch(
            f"SELECT {_ALERT_COLUMNS} FROM alerts {query.sql()}"
            f" ORDER BY opened_at DESC, id DESC LIMIT {query.arg(limit)}",
            *query.args,
        )
        return [_alert(r) for r in rows]
