"""Opaque cursors: the position after the last item of a page, as URL-safe base64 of a JSON array."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime
from typing import Any

import msgspec

from iot_api.problems import invalid


def encode_cursor(*position: Any) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(list(position))).decode().rstrip("=")


def decode_cursor(cursor: str, types: tuple[type, ...]) -> tuple[Any, ...]:
    """The position in ``cursor`` converted to ``types``; a 422 naming ``cursor`` when it is not one."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = msgspec.json.decode(raw, type=list[Any])
        if len(values) != len(types):
            raise ValueError("wrong length")
        return tuple(msgspec.convert(v, t) for v, t in zip(values, types, strict=True))
    except (ValueError, binascii.Error, msgspec.DecodeError, msgspec.ValidationError):
        raise invalid("cursor", "not a cursor returned by this endpoint") from None


def decode_time_position(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    """The (time, id) position of a newest-first page of rows with UUID ids; None without a cursor."""
    if not cursor:
        return None
    ts, id_ = decode_cursor(cursor, (datetime, uuid.UUID))
    return ts, id_
