"""Opaque cursors: the position after the last item of a page, as URL-safe base64 of a JSON array."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec

from iot_api.problems import invalid

# What a position may hold, so that a forged cursor is refused here and never reaches a query: ids in the
# int64 range of the columns, text without NUL (PostgreSQL refuses it) and of a sane length.
_CONSTRAINED: dict[type, Any] = {
    int: Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)],
    str: Annotated[str, msgspec.Meta(max_length=256, pattern=r"^[^\x00]*$")],
}


def encode_cursor(*position: Any) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(list(position))).decode().rstrip("=")


def decode_cursor(cursor: str, types: tuple[Any, ...]) -> tuple[Any, ...]:
    """The position in ``cursor`` converted to ``types``; a 422 naming ``cursor`` when it is not one."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = msgspec.json.decode(raw, type=list[Any])
        if len(values) != len(types):
            raise ValueError("wrong length")
        converted = (msgspec.convert(v, _CONSTRAINED.get(t, t)) for v, t in zip(values, types, strict=True))
        return tuple(_aware(v) if isinstance(v, datetime) else v for v in converted)
    except (
        ValueError,
        OverflowError,
        RecursionError,
        binascii.Error,
        msgspec.DecodeError,
        msgspec.ValidationError,
    ):
        raise invalid("cursor", "not a cursor returned by this endpoint") from None


def _aware(ts: datetime) -> datetime:
    """A cursor's time in UTC (one without zone is taken as UTC), so that it compares with any other;
    OverflowError when the offset moves it past the dates Python has."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def decode_time_position(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    """The (time, id) position of a newest-first page of rows with UUID ids; None without a cursor."""
    if not cursor:
        return None
    ts, id_ = decode_cursor(cursor, (datetime, uuid.UUID))
    return ts, id_
