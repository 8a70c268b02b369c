"""Alert rules (written by the API, read by ingest) and alerts (opened and resolved by ingest)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from iot_api.schemas import ActionView, Alert, AlertRule, CommandAction, WebhookActionView

_RULE_COLUMNS = (
    "id, name, device_id, device_type, metric, op, threshold, for_seconds, hysteresis, severity, message,"
    " action, enabled, created_at, updated_at"
)
_ALERT_COLUMNS = (
    "id, rule_id, device_id, metric, severity, state, message, value, threshold, opened_at, resolved_at,"
    " acked_at, acked_by"
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
    return AlertRule(
        id=str(row["id"]),
        name=row["name"],
        device_id=row["device_id"],
        device_type=row["device_type"],
        metric=row["metric"],
        op=row["op"],
        threshold=row["threshold"],
        for_seconds=row["for_seconds"],
        hysteresis=row["hysteresis"],
        severity=row["severity"],
        message=row["message"],
        action=_action_view(row["action"]),
        enabled=row["enabled"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _alert(row: asyncpg.Record) -> Alert:
    return Alert(
        id=str(row["id"]),
        rule_id=str(row["rule_id"]),
        device_id=row["device_id"],
        metric=row["metric"],
        severity=row["severity"],
        state=row["state"],
        message=row["message"],
        value=row["value"],
        threshold=row["threshold"],
        opened_at=row["opened_at"],
        resolved_at=row["resolved_at"],
        acked_at=row["acked_at"],
        acked_by=row["acked_by"],
    )


# Checked in the same statement as the change, so that a webhook set meanwhile is not changed by a non-admin.
_NO_WEBHOOK_UNLESS_2 = "$2 OR action IS NULL OR action->>'type' IS DISTINCT FROM 'webhook'"


class _Where:
    """WHERE clauses with numbered arguments, built from values the service checked."""

    def __init__(self) -> None:
        self.clauses: list[str] = []
        self.args: list[Any] = []

    def arg(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"

    def add(self, clause: str) -> None:
        self.clauses.append(clause)

    def sql(self) -> str:
        return f"WHERE {' AND '.join(self.clauses)}" if self.clauses else ""


class AlertRuleRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def get(self, rule_id: uuid.UUID) -> AlertRule | None:
        row = await self.pool.fetchrow(f"SELECT {_RULE_COLUMNS} FROM alert_rules WHERE id = $1", rule_id)
        return None if row is None else _rule(row)

    async def stored_action(self, rule_id: uuid.UUID) -> dict[str, Any] | None:
        """The rule's action as stored (a webhook's headers included): for the service, never a client."""
        action: dict[str, Any] | None = await self.pool.fetchval(
            "SELECT action FROM alert_rules WHERE id = $1", rule_id
        )
        return action

    async def create(self, values: dict[str, Any]) -> AlertRule:
        """Insert a rule; raises asyncpg's ForeignKeyViolationError when ``device_id`` is unknown."""
        columns = list(values)
        placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        row = await self.pool.fetchrow(
            f"INSERT INTO alert_rules ({', '.join(columns)}) VALUES ({placeholders})"
            f" RETURNING {_RULE_COLUMNS}",
            *values.values(),
        )
        assert row is not None
        return _rule(row)

    async def update(
        self, rule_id: uuid.UUID, changes: dict[str, Any], *, webhook_allowed: bool = True
    ) -> AlertRule | None:
        """Set the given columns (names come from the service, never from the client); None when the rule
        is gone, or has a webhook action and ``webhook_allowed`` is false."""
        sets = [f"{column} = ${i}" for i, column in enumerate(changes, start=3)]
        sets.append("updated_at = now()")
        row = await self.pool.fetchrow(
            f"UPDATE alert_rules SET {', '.join(sets)} WHERE id = $1 AND ({_NO_WEBHOOK_UNLESS_2})"
            f" RETURNING {_RULE_COLUMNS}",
            rule_id,
            webhook_allowed,
            *changes.values(),
        )
        return None if row is None else _rule(row)

    async def delete(self, rule_id: uuid.UUID, *, webhook_allowed: bool = True) -> bool:
        """Delete the rule; False when it is gone, or has a webhook action and ``webhook_allowed`` is off."""
        status = await self.pool.execute(
            f"DELETE FROM alert_rules WHERE id = $1 AND ({_NO_WEBHOOK_UNLESS_2})", rule_id, webhook_allowed
        )
        return status.endswith(" 1")

    async def list(
        self,
        *,
        device_id: str | None,
        device_type: str | None,
        enabled: bool | None,
        after: tuple[datetime, uuid.UUID] | None,
        limit: int,
    ) -> list[AlertRule]:
        """Newest first, after the position ``after`` (created_at, id)."""
        where = _Where()
        if device_id is not None:
            where.add(f"device_id = {where.arg(device_id)}")
        if device_type is not None:
            where.add(f"device_type = {where.arg(device_type)}")
        if enabled is not None:
            where.add(f"enabled = {where.arg(enabled)}")
        if after is not None:
            where.add(f"(created_at, id) < ({where.arg(after[0])}, {where.arg(after[1])})")
        rows = await self.pool.fetch(
            f"SELECT {_RULE_COLUMNS} FROM alert_rules {where.sql()}"
            f" ORDER BY created_at DESC, id DESC LIMIT {where.arg(limit)}",
            *where.args,
        )
        return [_rule(r) for r in rows]


class AlertRepository:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def get(self, alert_id: uuid.UUID) -> Alert | None:
        row = await self.pool.fetchrow(f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id = $1", alert_id)
        return None if row is None else _alert(row)

    async def ack(self, alert_id: uuid.UUID, principal: str) -> tuple[Alert, bool] | None:
        """Acknowledge the alert unless it already is; (alert, whether this call acknowledged it)."""
        row = await self.pool.fetchrow(
            f"""
            UPDATE alerts SET acked_at = now(), acked_by = $2
            WHERE id = $1 AND acked_at IS NULL RETURNING {_ALERT_COLUMNS}
            """,
            alert_id,
            principal,
        )
        if row is not None:
            return _alert(row), True
        alert = await self.get(alert_id)
        return None if alert is None else (alert, False)

    async def list(
        self,
        *,
        device_id: str | None,
        state: str | None,
        severity: str | None,
        start: datetime | None,
        end: datetime | None,
        after: tuple[datetime, uuid.UUID] | None,
        limit: int,
    ) -> list[Alert]:
        """Newest first by ``opened_at``, after the position ``after`` (opened_at, id)."""
        where = _Where()
        if device_id is not None:
            where.add(f"device_id = {where.arg(device_id)}")
        if state is not None:
            where.add(f"state = {where.arg(state)}")
        if severity is not None:
            where.add(f"severity = {where.arg(severity)}")
        if start is not None:
            where.add(f"opened_at >= {where.arg(start)}")
        if end is not None:
            where.add(f"opened_at < {where.arg(end)}")
        if after is not None:
            where.add(f"(opened_at, id) < ({where.arg(after[0])}, {where.arg(after[1])})")
        rows = await self.pool.fetch(
            f"SELECT {_ALERT_COLUMNS} FROM alerts {where.sql()}"
            f" ORDER BY opened_at DESC, id DESC LIMIT {where.arg(limit)}",
            *where.args,
        )
        return [_alert(r) for r in rows]
