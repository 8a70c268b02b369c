"""Device state (desired and reported, versioned): the documents, their limits, the MQTT messages and the
SQL, shared by the API (desired side) and ingest (reported side). See docs/device-state.md.

A device's state is one row of ``device_state``: ``desired`` (what operators ask for), ``reported`` (what
the device says it has), and ``version``, which increases by one on every change of either side. Every
change is also a row of ``device_state_history``. Both sides change by JSON merge patch (RFC 7386,
:func:`merge_patch`); ``delta`` (:func:`compute_delta`) is what the device still has to apply.

The desired message (:class:`DesiredMessage`) is published retained on ``devices/state/{id}/desired``
by :func:`publish_desired`, under a per-device PostgreSQL advisory lock and after re-reading the row, so
that the retained message never goes back to an older version however many processes publish.

Nothing here imports asyncpg: the SQL helpers take any asyncpg connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Literal

import msgspec

from iot_common.messages import StateEvent
from iot_common.topics import state_desired_topic

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[Any] | PoolConnectionProxy[Any]

JsonObject = dict[str, Any]
StateSide = Literal["desired", "reported"]

MAX_STATE_BYTES: Final = 16 * 1024
"""Largest document (a patch, or the desired or reported state after merging), as compact JSON."""
MAX_STATE_DEPTH: Final = 8
"""Deepest nesting of objects and arrays in a document (the top-level object is depth 1)."""
MAX_STATE_KEY_CHARS: Final = 128
"""Longest key of an object in a document."""


class StateProblem(ValueError):
    """Why a state document is refused: ``field`` names the place (``desired.a.b``), ``reason`` what."""

    def __init__(self, field: str, reason: str, code: Literal["too_large", "too_deep", "invalid"]) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.code = code


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: ``patch`` applied to ``target`` (neither is modified).

    An object patch merges key by key, ``null`` removing a key; any other patch replaces the target.
    """
    if not isinstance(patch, dict):
        return patch
    result: JsonObject = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def compute_delta(desired: JsonObject, reported: JsonObject) -> JsonObject:
    """The desired keys whose reported value differs; nested objects compared key by key (the delta of
    an object holds only its differing keys)."""
    delta: JsonObject = {}
    for key, want in desired.items():
        have = reported.get(key, _MISSING)
        if isinstance(want, dict) and isinstance(have, dict):
            inner = compute_delta(want, have)
            if inner:
                delta[key] = inner
        elif have is _MISSING or not _same(want, have):
            delta[key] = want
    return delta


_MISSING: Final = object()


def _same(a: Any, b: Any) -> bool:
    # JSON has one number type, but True == 1 in Python: a boolean equals only a boolean.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def check_document(doc: Any, field: str) -> None:
    """Raise :class:`StateProblem` unless ``doc`` is a JSON object within the limits and storable as
    jsonb (no NUL character)."""
    if not isinstance(doc, dict):
        raise StateProblem(field, "must be a JSON object", "invalid")
    size = len(msgspec.json.encode(doc))
    if size > MAX_STATE_BYTES:
        raise StateProblem(field, f"{size} bytes, at most {MAX_STATE_BYTES}", "too_large")
    _check_value(doc, field, 1)


def _check_value(value: Any, field: str, depth: int) -> None:
    if isinstance(value, dict | list) and depth > MAX_STATE_DEPTH:
        raise StateProblem(field, f"nested deeper than {MAX_STATE_DEPTH} levels", "too_deep")
    if isinstance(value, dict):
        for key, item in value.items():
            if len(key) > MAX_STATE_KEY_CHARS:
                raise StateProblem(f"{field}.{key[:40]}", f"key longer than {MAX_STATE_KEY_CHARS}", "invalid")
            if "\x00" in key:
                raise StateProblem(field, "keys must not contain NUL characters", "invalid")
            _check_value(item, f"{field}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_value(item, f"{field}[{index}]", depth + 1)
    elif isinstance(value, str) and "\x00" in value:
        raise StateProblem(field, "must not contain NUL characters", "invalid")


class DesiredMessage(msgspec.Struct, frozen=True):
    """What a device receives on ``devices/state/{device_id}/desired`` (QoS 1, retained)."""

    version: int
    desired: JsonObject
    delta: JsonObject


class ReportedMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a device sends on ``devices/state/{device_id}/reported`` (QoS 1): a merge patch of its
    reported state, and optionally the desired ``version`` it applied."""

    reported: JsonObject
    version: int | None = None


_reported_decoder: Final = msgspec.json.Decoder(ReportedMessage)
_encoder: Final = msgspec.json.Encoder()


def decode_reported(payload: bytes) -> ReportedMessage:
    """Parse a report; raises :class:`StateProblem` (code ``invalid``, ``too_large``, ``too_deep``) or
    :class:`msgspec.DecodeError` for a payload that is not JSON of that shape."""
    if len(payload) > MAX_STATE_BYTES + 64:
        raise StateProblem("payload", f"{len(payload)} bytes, at most {MAX_STATE_BYTES + 64}", "too_large")
    message = _reported_decoder.decode(payload)
    check_document(message.reported, "reported")
    if message.version is not None and message.version < 0:
        raise StateProblem("version", "must not be negative", "invalid")
    return message


def encode_desired(message: DesiredMessage) -> bytes:
    return _encoder.encode(message)


class DeviceState(msgspec.Struct, frozen=True):
    """One device's state as stored (``version`` 0 and empty documents: nothing was ever set)."""

    device_id: str
    desired: JsonObject
    reported: JsonObject
    delta: JsonObject
    version: int
    desired_at: datetime | None
    reported_at: datetime | None

    def event(self) -> StateEvent:
        return StateEvent(self.device_id, self.desired, self.reported, self.delta, self.version)

    def desired_message(self) -> DesiredMessage:
        return DesiredMessage(self.version, self.desired, self.delta)


def empty_state(device_id: str) -> DeviceState:
    return DeviceState(device_id, {}, {}, {}, 0, None, None)


def _state(device_id: str, row: Any) -> DeviceState:
    desired, reported = row["desired"], row["reported"]
    return DeviceState(
        device_id,
        desired,
        reported,
        compute_delta(desired, reported),
        row["version"],
        row["desired_at"],
        row["reported_at"],
    )


STATE_COLUMNS: Final = "desired, reported, version, desired_at, reported_at"
SELECT_STATE: Final = f"""
SELECT {STATE_COLUMNS} FROM device_state WHERE tenant_id = $1::uuid AND device_id = $2
"""
ENSURE_ROW: Final = """
INSERT INTO device_state (tenant_id, device_id) VALUES ($1::uuid, $2) ON CONFLICT DO NOTHING
"""
LOCK_ROW: Final = f"""
SELECT {STATE_COLUMNS} FROM device_state WHERE tenant_id = $1::uuid AND device_id = $2 FOR UPDATE
"""
UPDATE_DESIRED: Final = f"""
UPDATE device_state SET desired = $3::jsonb, version = version + 1, desired_at = now()
WHERE tenant_id = $1::uuid AND device_id = $2
RETURNING {STATE_COLUMNS}
"""
UPDATE_REPORTED: Final = f"""
UPDATE device_state SET reported = $3::jsonb, version = version + 1, reported_at = $4
WHERE tenant_id = $1::uuid AND device_id = $2
RETURNING {STATE_COLUMNS}
"""
INSERT_HISTORY: Final = """
INSERT INTO device_state_history (tenant_id, device_id, version, side, patch, actor, applied_version, at)
VALUES ($1::uuid, $2, $3, $4, $5::jsonb, $6, $7, $8)
"""


async def read_state(conn: Conn, tenant_id: str, device_id: str) -> DeviceState:
    row = await conn.fetchrow(SELECT_STATE, tenant_id, device_id)
    return empty_state(device_id) if row is None else _state(device_id, row)


class StaleVersion(Exception):
    """The state's version is not the one the change was conditioned on (``If-Match``)."""

    def __init__(self, current: int) -> None:
        super().__init__(f"state is at version {current}")
        self.current = current


async def apply_change(
    conn: Conn,
    tenant_id: str,
    device_id: str,
    side: StateSide,
    patch: JsonObject,
    actor: str,
    *,
    at: datetime,
    expected_version: int | None = None,
    applied_version: int | None = None,
) -> DeviceState | None:
    """Merge ``patch`` into one side of the device's state, inside the caller's transaction (the row is
    locked until it ends, so concurrent changes of one device serialize). The device must exist in the
    tenant (foreign key).

    Returns the new state, or None when a report changed nothing (a desired patch always makes a new
    version: it is an operator's decision, recorded in the history). Raises :class:`StaleVersion` when
    ``expected_version`` is given and is not the current one, :class:`StateProblem` when the merged
    document is past the limits.
    """
    await conn.execute(ENSURE_ROW, tenant_id, device_id)
    row = await conn.fetchrow(LOCK_ROW, tenant_id, device_id)
    assert row is not None
    if expected_version is not None and row["version"] != expected_version:
        raise StaleVersion(row["version"])
    current: JsonObject = row[side]
    merged = merge_patch(current, patch)
    check_document(merged, side)
    if side == "reported" and merged == current:
        return None
    if side == "desired":
        updated = await conn.fetchrow(UPDATE_DESIRED, tenant_id, device_id, merged)
    else:
        updated = await conn.fetchrow(UPDATE_REPORTED, tenant_id, device_id, merged, at)
    assert updated is not None
    await conn.execute(
        INSERT_HISTORY, tenant_id, device_id, updated["version"], side, patch, actor, applied_version, at
    )
    return _state(device_id, updated)


PUBLISH_LOCK: Final = "SELECT pg_advisory_xact_lock(hashtextextended('device_state:' || $1, 0))"
SELECT_FOR_PUBLISH: Final = f"""
SELECT {STATE_COLUMNS} FROM device_state WHERE device_id = $1 AND version > 0
"""

Publish = Callable[[str, bytes], Awaitable[object]]
"""Publishes a payload retained at QoS 1 on a topic and returns once the broker acknowledged it."""


async def publish_desired(pool: asyncpg.Pool[Any], device_ids: Iterable[str], publish: Publish) -> int:
    """Publish each device's current desired message (retained, through ``publish``); returns how many.

    Each publication happens under the device's advisory lock, after re-reading the row: of two processes
    publishing one device, the second re-reads what the first saw or newer, so the last retained message
    is always the current version. Devices that never had a state are skipped. Publish errors propagate.
    """
    published = 0
    for device_id in device_ids:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(PUBLISH_LOCK, device_id)
            row = await conn.fetchrow(SELECT_FOR_PUBLISH, device_id)
            if row is None:
                continue
            state = _state(device_id, row)
            await publish(state_desired_topic(device_id), encode_desired(state.desired_message()))
            published += 1
    return published


STATE_COPY_SCRIPT: Final = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '-1')
if current >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'event', ARGV[2])
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[2]) end
return 1
"""
"""Keeps the Redis copy of a device's state (``RedisNames.state_key``: a hash of ``version`` and the
encoded ``StateEvent``) and publishes the event on the device's channel, only when the version is newer
than the copy's: a copy never goes back, and no subscriber sees an older state after a newer one.

KEYS: the state key. ARGV: the version, the encoded event, the device channel (empty: publish nothing,
the caller publishes; on a Redis Cluster, by sharded pub/sub: :func:`iot_common.redis_client.copy_state`)."""


async def clear_desired(pool: asyncpg.Pool[Any], device_id: str, publish: Publish) -> None:
    """Remove the retained desired message of a deleted device (an empty retained payload), under the
    device's advisory lock so that no publication of its old state can follow it. A later device with the
    same id then starts with no desired message (and at version 0)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(PUBLISH_LOCK, device_id)
        await publish(state_desired_topic(device_id), b"")
