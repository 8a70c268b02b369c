"""Which earlier action runs hold a run back, as every ingest replica reads them from ``action_runs``."""

from __future__ import annotations

from typing import Any

import asyncpg

from iot_common.alerts import Trigger, WebhookAction
from iot_common.messages import AlertEvent
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_ingest.actions import EARLIER_UNFINISHED, queue_run

HORIZON_S = 20.0
DEFAULT = str(DEFAULT_TENANT_ID)
HOOK = WebhookAction(url="http://hooks.example.com/iot", on=["open", "resolve"])


async def add_rule(db: asyncpg.Connection[Any]) -> str:
    return str(
        await db.fetchval(
            "INSERT INTO alert_rules (name, device_type, metric, op, threshold, tenant_id) "
            "VALUES ('hot', 'generic', 'temperature', '>', 30, $1) RETURNING id::text",
            DEFAULT_TENANT_ID,
        )
    )


async def add_alert(db: asyncpg.Connection[Any], rule_id: str, device_id: str) -> AlertEvent:
    row = await db.fetchrow(
        "INSERT INTO alerts (rule_id, device_id, metric, severity, value, threshold, state) "
        "VALUES ($1::uuid, $2, 'temperature', 'warning', 31, 30, 'resolved') "
        "RETURNING id::text, rule_id::text, device_id, metric, severity, state, message, value, threshold, "
        "opened_at, resolved_at, acked_at",
        rule_id,
        device_id,
    )
    return AlertEvent(**dict(row))


async def queued(db: asyncpg.Connection[Any], alert: AlertEvent, trigger: Trigger = "open") -> Any:
    """A run inserted in its own transaction, as the alert transaction of some replica does."""
    async with db.transaction():
        job = await queue_run(db, trigger, alert, HOOK, DEFAULT)
    return job.run_id


async def earlier(db: asyncpg.Connection[Any], run_id: Any) -> int:
    return int(await db.fetchval(EARLIER_UNFINISHED, run_id, HORIZON_S))


async def test_a_run_waits_for_the_unfinished_earlier_runs_of_its_rule_and_device_only(
    db: asyncpg.Connection[Any],
) -> None:
    rule, other_rule = await add_rule(db), await add_rule(db)
    alert = await add_alert(db, rule, "boiler-1")
    first = await queued(db, alert, "open")
    # Another device of the rule, and the same device under another rule: other keys.
    await queued(db, await add_alert(db, rule, "boiler-2"))
    await queued(db, await add_alert(db, other_rule, "boiler-1"))
    second = await queued(db, alert, "resolve")
    next_alert = await queued(db, await add_alert(db, rule, "boiler-1"))

    assert await earlier(db, first) == 0
    assert await earlier(db, second) == 1
    assert await earlier(db, next_alert) == 2
    await db.execute("UPDATE action_runs SET state = 'running', started_at = now() WHERE id = $1", first)
    assert await earlier(db, second) == 1
    await db.execute("UPDATE action_runs SET state = 'failed', finished_at = now() WHERE id = $1", first)
    assert await earlier(db, second) == 0
    assert await earlier(db, next_alert) == 1


async def test_a_run_left_behind_by_a_stopped_replica_holds_nothing_once_older_than_the_horizon(
    db: asyncpg.Connection[Any],
) -> None:
    rule = await add_rule(db)
    alert = await add_alert(db, rule, "boiler-1")
    stuck_running, stuck_queued = await queued(db, alert, "open"), await queued(db, alert, "open")
    later = await queued(db, alert, "resolve")
    assert await earlier(db, later) == 2
    await db.execute(
        "UPDATE action_runs SET state = 'running', started_at = now() - make_interval(secs => $2) "
        "WHERE id = $1",
        stuck_running,
        HORIZON_S + 1,
    )
    assert await earlier(db, later) == 1
    await db.execute(
        "UPDATE action_runs SET created_at = now() - make_interval(secs => $2) WHERE id = $1",
        stuck_queued,
        HORIZON_S + 1,
    )
    assert await earlier(db, later) == 0


async def test_runs_written_in_one_alert_transaction_keep_their_order(db: asyncpg.Connection[Any]) -> None:
    rule = await add_rule(db)
    alert = await add_alert(db, rule, "boiler-1")
    async with db.transaction():
        opening = (await queue_run(db, "open", alert, HOOK, DEFAULT)).run_id
        resolution = (await queue_run(db, "resolve", alert, HOOK, DEFAULT)).run_id
    assert await earlier(db, opening) == 0
    assert await earlier(db, resolution) == 1
