"""Commands to devices: the rows, the MQTT payload and the Redis event, shared by the API and ingest.

Life of a command (``commands.state``): ``pending`` (row inserted) -> ``sent`` (published on
``devices/commands/{device_id}`` at QoS 1) -> ``acked`` or ``failed`` (the device answered on
``devices/commands/{device_id}/ack``) or ``expired`` (no answer before ``expires_at``). A command for a
device whose status is ``offline`` is inserted ``queued`` instead: ingest claims it (``queued`` ->
``pending``, :func:`claim_queued`) when the device comes online and goes on as above, or it becomes
``expired`` at ``expires_at`` without ever being published. Every change is published as a
:class:`~iot_common.messages.CommandEvent` on the device's Redis channel. The caller owns
the MQTT client (gmqtt, aiomqtt...): this module gives it the topic and the payload bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import msgspec
import redis.asyncio as aioredis

from iot_common.messages import CommandAck, CommandEvent, CommandMessage, encode_event
from iot_common.topics import RedisNames, command_topic

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[Any] | PoolConnectionProxy[Any]
    Executor = Conn | asyncpg.Pool[Any]

CommandName = Annotated[
    str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}(?!\n)$", examples=["reboot", "set_interval"])
]
"""A command's name: what the API sends and what an alert rule's command action names."""
CommandTtl = Annotated[int, msgspec.Meta(ge=1, le=7 * 86400)]
"""How long a command waits for its answer before it expires, in seconds (at most 7 days)."""

COMMAND_COLUMNS: Final = (
    "id::text AS id, device_id, name, params, state, result, error, created_at, updated_at, expires_at"
)
"""Columns of ``commands`` as every service reads them (``id`` as text): the API's responses and
:func:`command_event`."""

INSERT_COMMAND: Final = f"""
INSERT INTO commands (device_id, name, params, expires_at, state)
VALUES ($1, $2, $3::jsonb, coalesce($4::timestamptz, now() + $5::interval), $6)
RETURNING {COMMAND_COLUMNS}
"""
MARK_SENT: Final = f"""
UPDATE commands SET state = 'sent', updated_at = now()
WHERE id = $1::uuid AND state = 'pending'
RETURNING {COMMAND_COLUMNS}
"""
MARK_FAILED: Final = f"""
UPDATE commands SET state = 'failed', error = $2, updated_at = now()
WHERE id = $1::uuid AND state = 'pending'
RETURNING {COMMAND_COLUMNS}
"""
APPLY_ACKS: Final = f"""
UPDATE commands c
SET state = u.state, result = u.result::jsonb, error = u.error, updated_at = now()
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
     AS u(id, device_id, state, result, error)
WHERE c.id = u.id AND c.device_id = u.device_id AND c.state IN ('pending', 'sent')
RETURNING {", ".join("c." + c.strip() for c in COMMAND_COLUMNS.split(","))}, c.tenant_id::text AS tenant_id
"""
EXPIRE_COMMANDS: Final = f"""
UPDATE commands SET state = 'expired', updated_at = now()
WHERE state IN ('queued', 'pending', 'sent') AND expires_at <= now()
RETURNING {COMMAND_COLUMNS}, tenant_id::text AS tenant_id
"""
LOCK_DEVICE_QUEUE_XACT: Final = "SELECT pg_advisory_xact_lock($1, hashtext($2))"
DEVICE_STATUS: Final = "SELECT status FROM devices WHERE tenant_id = $1 AND id = $2"
LOCK_DEVICE_QUEUE: Final = "SELECT pg_advisory_lock($1, hashtext($2))"
UNLOCK_DEVICE_QUEUE: Final = "SELECT pg_advisory_unlock($1, hashtext($2))"
CLAIM_QUEUED: Final = f"""
UPDATE commands SET state = 'pending', error = NULL, updated_at = now()
WHERE id = (
    SELECT id FROM commands
    WHERE device_id = $1 AND state = 'queued' AND expires_at > now()
    ORDER BY created_at, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
) AND state = 'queued'
RETURNING {COMMAND_COLUMNS}, tenant_id::text AS tenant_id
"""
REQUEUE: Final = f"""
UPDATE commands SET state = 'queued', error = $2, updated_at = now()
WHERE id = $1::uuid AND state = 'pending'
RETURNING {COMMAND_COLUMNS}, tenant_id::text AS tenant_id
"""

QUEUE_LOCK_CLASS: Final = 0x10770012
"""First key of the per-device advisory lock (second key: ``hashtext(device_id)``) that serializes the
API's "offline, so queue" decision with ingest's flush of the device's queue: whichever comes second sees
what the other did (the API the ``online`` status, or the flush the ``queued`` row)."""

EXPIRY_LOCK_KEY: Final = 0x10770006
"""Advisory lock held by the one process (of any replicas) expiring commands at a time."""

_message_encoder: Final = msgspec.json.Encoder()
_ack_decoder: Final = msgspec.json.Decoder(CommandAck)
_result_encoder: Final = msgspec.json.Encoder()


AckProblem = Literal["invalid_command_ack", "malformed_json", "too_deep"]


class InvalidAck(ValueError):
    """A payload on an ack topic that is not a :class:`CommandAck` with a UUID ``id``.

    ``reason``: ``malformed_json`` for invalid UTF-8, ``too_deep`` for JSON nested deeper than the
    recursion limit, ``invalid_command_ack`` for anything else.
    """

    def __init__(self, detail: str, reason: AckProblem = "invalid_command_ack") -> None:
        super().__init__(detail)
        self.reason: AckProblem = reason


def command_message(
    command_id: str, name: str, params: Mapping[str, Any], expires_at: datetime | None
) -> bytes:
    """The JSON payload published to the device on ``devices/commands/{device_id}`` (QoS 1)."""
    return _message_encoder.encode(CommandMessage(command_id, name, dict(params), expires_at))


def command_publication(device_id: str, record: Mapping[str, Any]) -> tuple[str, bytes]:
    """Topic and payload that deliver the command ``record`` (a row with :data:`COMMAND_COLUMNS`)."""
    payload = command_message(record["id"], record["name"], record["params"] or {}, record["expires_at"])
    return command_topic(device_id), payload


def command_event(record: Mapping[str, Any]) -> CommandEvent:
    """The Redis/WebSocket event for a row with :data:`COMMAND_COLUMNS`."""
    return CommandEvent(
        id=str(record["id"]),
        device_id=record["device_id"],
        name=record["name"],
        state=record["state"],
        params=record["params"] or {},
        result=record["result"],
        error=record["error"],
        updated_at=record["updated_at"],
    )


async def create_command(
    conn: Executor,
    device_id: str,
    name: str,
    params: Mapping[str, Any],
    expires_at: datetime | timedelta | None,
    state: Literal["pending", "queued"] = "pending",
) -> Any:
    """Insert a ``pending`` (or ``queued``) command and return its row (:data:`COMMAND_COLUMNS`).

    ``expires_at``: an instant, or a time to live counted from the database's clock (the clock that
    :func:`expire_commands` compares with). asyncpg's ForeignKeyViolationError: no such device.
    """
    ttl = expires_at if isinstance(expires_at, timedelta) else None
    at = None if isinstance(expires_at, timedelta) else expires_at
    return await conn.fetchrow(INSERT_COMMAND, device_id, name, dict(params), at, ttl, state)


async def device_status_locked(conn: Conn, tenant_id: str | uuid.UUID, device_id: str) -> str | None:
    """The device's status, taking its queue lock until the end of the caller's transaction (which must
    be open); None when the device is not the tenant's."""
    await conn.execute(LOCK_DEVICE_QUEUE_XACT, QUEUE_LOCK_CLASS, device_id)
    # A statement of its own, after the lock: its snapshot sees a status committed before the lock was had.
    status: str | None = await conn.fetchval(DEVICE_STATUS, tenant_id, device_id)
    return status


async def claim_queued(conn: Executor, device_id: str) -> Any:
    """``queued`` -> ``pending`` for the device's oldest queued command whose deadline has not passed; the
    row (with ``tenant_id``), or None when none is left. One statement: two processes never claim the same
    command."""
    return await conn.fetchrow(CLAIM_QUEUED, device_id)


async def requeue(conn: Executor, command_id: str, error: str) -> Any:
    """``pending`` -> ``queued`` with the reason when a claimed command could not be published; the row,
    or None when it was answered meanwhile."""
    return await conn.fetchrow(REQUEUE, command_id, error)


async def mark_sent(conn: Executor, command_id: str) -> Any:
    """``pending`` -> ``sent`` once published; the row, or None when it was no longer pending."""
    return await conn.fetchrow(MARK_SENT, command_id)


async def mark_failed(conn: Executor, command_id: str, error: str) -> Any:
    """``pending`` -> ``failed`` when it could not be published; the row, or None."""
    return await conn.fetchrow(MARK_FAILED, command_id, error)


async def expire_commands(conn: Conn) -> list[tuple[str, CommandEvent]]:
    """Expire waiting commands past ``expires_at``, under an advisory lock so one replica does it at a time.

    Returns the events to publish with their device's tenant (empty when another process holds the lock).
    """
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", EXPIRY_LOCK_KEY):
            return []
        return [(r["tenant_id"], command_event(r)) for r in await conn.fetch(EXPIRE_COMMANDS)]


def decode_ack(payload: bytes) -> CommandAck:
    """A device's answer; raises :class:`InvalidAck` with the reason when it is malformed."""
    try:
        ack = _ack_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise InvalidAck(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise InvalidAck(f"invalid UTF-8: {exc}", "malformed_json") from None
    except RecursionError:
        raise InvalidAck("JSON nested too deep", "too_deep") from None
    try:
        uuid.UUID(ack.id)
    except ValueError:
        raise InvalidAck(f"id {ack.id[:64]!r} is not a UUID") from None
    return ack


def ack_columns(
    acks: list[tuple[str, CommandAck]],
) -> tuple[list[str], list[str], list[str], list[str | None], list[str | None]]:
    """Arguments of :data:`APPLY_ACKS` for (device id, ack) pairs; the first ack of a command wins."""
    seen: set[str] = set()
    ids: list[str] = []
    devices: list[str] = []
    states: list[str] = []
    results: list[str | None] = []
    errors: list[str | None] = []
    for device_id, ack in acks:
        if ack.id in seen:
            continue
        seen.add(ack.id)
        ids.append(ack.id)
        devices.append(device_id)
        states.append("acked" if ack.status == "ok" else "failed")
        results.append(None if ack.result is None else _result_encoder.encode(ack.result).decode())
        errors.append(ack.error)
    return ids, devices, states, results, errors


def publish_command_event(
    pipe: aioredis.Redis | Any, names: RedisNames, tenant_id: str | uuid.UUID, event: CommandEvent
) -> Any:
    """Queue (on a pipeline) or send the PUBLISH of ``event`` on its device's channel (in ``tenant_id``,
    the tenant of the device)."""
    return pipe.publish(names.device_channel(tenant_id, event.device_id), encode_event(event))
