"""Keyset pagination: opaque cursors and the one way every list endpoint pages.

A cursor is the position after the last item of a page (the values of the sort key), as URL-safe base64
of a JSON array. :func:`paginate` decodes it and fetches one row more than the page holds, to know whether
more follow.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Final, TypeVar

import msgspec

from iot_api.errors import Invalid
from iot_api.queries import PageRequest

T = TypeVar("T")
P = TypeVar("P")

TIME_AND_UUID: Final = (datetime, uuid.UUID)
"""The sort key of newest-first pages of rows with UUID ids: (a time, the id)."""

# What a position may hold, so that a forged cursor is refused here and never reaches a query: ids in the
# int64 range of the columns, text without NUL (PostgreSQL refuses it) and of a sane length.
_CONSTRAINED: dict[type, Any] = {
    int: Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)],
    str: Annotated[str, msgspec.Meta(max_length=256, pattern=r"^[^\x00]*$")],
}


def encode_cursor(*position: Any) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(list(position))).decode().rstrip("=")


def decode_cursor(cursor: str, types: tuple[Any, ...]) -> tuple[Any, ...]:
    """The position in ``cursor`` converted to ``types``; :class:`Invalid` naming ``cursor`` when it is
    not one."""
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
        raise Invalid("cursor", "not a cursor returned by this endpoint") from None


def decode_position(cursor: str | None, types: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The position a page starts after; None for the first page (no cursor)."""
    return decode_cursor(cursor, types) if cursor else None


def _aware(ts: datetime) -> datetime:
    """A cursor's time in UTC (one without zone is taken as UTC), so that it compares with any other;
    OverflowError when the offset moves it past the dates Python has."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


async def paginate(
    page: Callable[..., P],
    request: PageRequest,
    key: tuple[Any, ...],
    fetch: Callable[[tuple[Any, ...] | None, int], Awaitable[Sequence[T]]],
    position: Callable[[T], tuple[Any, ...]],
    **fields: Any,
) -> P:
    """The page ``request`` asks for, built by ``page`` (with the other ``fields`` of the page).

    ``key``: the types of the sort key (the cursor holds a position of them); ``fetch(after, n)``: the
    first ``n`` rows after the position ``after`` (None: from the start); ``position(item)``: an item's key.
    """
    after = decode_position(request.cursor, key)
    rows = await fetch(after, request.limit + 1)
    items = list(rows[: request.limit])
    has_more = len(rows) > request.limit and bool(items)
    next_cursor = encode_cursor(*position(items[-1])) if has_more else None
    return page(items=items, has_more=has_more, next_cursor=next_cursor, **fields)
