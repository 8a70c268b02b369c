"""What a read asks for besides its filters: which page, and which time range."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

MIN_TS = datetime(1970, 1, 1, tzinfo=UTC)
MAX_TS = datetime(9000, 1, 1, tzinfo=UTC)


def utc(ts: datetime | None) -> datetime | None:
    """A timestamp without zone is taken as UTC; the range is clamped to what makes sense to query."""
    if ts is None:
        return None
    ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    return min(max(ts, MIN_TS), MAX_TS)


@dataclass(frozen=True)
class PageRequest:
    """At most ``limit`` items after the position in ``cursor`` (None: the first page)."""

    limit: int
    cursor: str | None = None


@dataclass(frozen=True)
class TimeRange:
    """From ``start`` (inclusive) to ``end`` (exclusive); either may be open (None)."""

    start: datetime | None = None
    end: datetime | None = None

    def in_utc(self) -> TimeRange:
        """The range in UTC, clamped to the dates worth querying (see :func:`utc`)."""
        return TimeRange(utc(self.start), utc(self.end))
