"""Which rollup level serves which part of an aggregate's range,"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from iot_api.repositories.telemetry import Segment, plan_segments
from iot_api.rollup import LEVELS, RollupRetention, Watermarks

MINUTE, HOUR, DAY = LEVELS
NOW = datetime(2026, 6, 15, 10, 30, 20, tzinfo=UTC)
ROLLED = Watermarks(
    minute=datetime(2026, 6, 15, 10, tzinfo=UTC),
    hour=datetime(2026, 6, 15, 10, tzinfo=UTC),
    day=datetime(2026, 6, 15, tzinfo=UTC),
)
RETENTION = RollupRetention(30, 400, 3650)


def t(day: int, hour: int = 0, minute: int = 0, second: int = 0, month: int = 6) -> datetime:
    return datetime(2026, month, day, hour, minute, second, tzinfo=UTC)


def test_daily_buckets_read_days_then_hours_then_minutes_then_raw() -> None:
    segments = plan_segments(t(1, 7, 12, 30), NOW, timedelta(days=1), ROLLED, RETENTION, NOW)
    assert segments == [
        Segment(None, t(1, 7, 12, 30), t(1, 7, 13)),
        Segment(MINUTE, t(1, 7, 13), t(1, 8)),
        Segment(HOUR, t(1, 8), t(2)),
        Segment(DAY, t(2), t(15)),
        Segment(HOUR, t(15), t(15, 10)),
        Segment(None, t(15, 10), NOW),
    ]


def test_a_bucket_uses_only_levels_that_divide_it() -> None:
    # 5-minute buckets: minutes only (hours do not divide 5 minutes), raw after the watermark.
    assert plan_segments(t(14), NOW, timedelta(minutes=5), ROLLED, RETENTION, NOW) == [
        Segment(MINUTE, t(14), t(15, 10)),
        Segment(None, t(15, 10), NOW),
    ]
    # 2-hour buckets: hours, not days.
    assert plan_segments(t(10), t(14), timedelta(hours=2), ROLLED, RETENTION, NOW) == [
        Segment(HOUR, t(10), t(14)),
    ]


def test_a_level_past_its_retention_leaves_the_range_to_coarser_or_finer_ones() -> None:
    short = RollupRetention(2, 5, 3650)
    segments = plan_segments(t(1), t(14), timedelta(hours=1), ROLLED, short, NOW)
    # Hours are kept 5 days: before that, minutes are gone too and raw rows (dropped) answer what they can.
    assert segments == [Segment(None, t(1), t(10, 11)), Segment(HOUR, t(10, 11), t(14))]


def test_nothing_rolled_up_reads_raw_rows() -> None:
    none = Watermarks(None, None, None)
    assert plan_segments(t(1), NOW, timedelta(days=1), none, RETENTION, NOW) == [Segment(None, t(1), NOW)]
