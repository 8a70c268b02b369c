"""The seam of gap-free resume: live copies of readings a backfill sent are dropped, for a while only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from iot_common.messages import StatusEvent, TelemetryEvent, decode_event, encode_event
from iot_realtime.backfill import Seam

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def reading(device: str, ts: datetime, **metrics: float | str) -> TelemetryEvent:
    return TelemetryEvent(device_id=device, ts=ts, metrics=metrics)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_reading_sent_by_the_backfill_is_dropped_and_others_pass() -> None:
    seam = Seam()
    seam.add([reading("d1", T0, t=1.0, h=2.0)])
    assert seam.admit(encode_event(reading("d1", T0, t=1.0, h=2.0))) is None
    assert seam.admit(encode_event(reading("d1", T0, t=1.0))) is None
    later = encode_event(reading("d1", T0 + timedelta(microseconds=1), t=1.0))
    assert seam.admit(later) == later
    other = encode_event(reading("d2", T0, t=1.0))
    assert seam.admit(other) == other
    status = encode_event(StatusEvent(device_id="d1", status="online", ts=T0))
    assert seam.admit(status) == status
    assert seam.admit(b"not json") == b"not json"


def test_metrics_not_sent_yet_of_a_reading_pass_alone() -> None:
    seam = Seam()
    seam.add([reading("d1", T0, t=1.0)])
    admitted = seam.admit(encode_event(reading("d1", T0, t=1.0, extra="x")))
    assert admitted is not None
    assert decode_event(admitted) == reading("d1", T0, extra="x")


def test_the_same_instant_in_another_offset_is_the_same_reading() -> None:
    seam = Seam()
    seam.add([reading("d1", T0, t=1.0)])
    shifted = T0.astimezone(datetime.fromisoformat("2026-03-01T14:00:00+02:00").tzinfo)
    frame = msgspec.json.encode(
        {"type": "telemetry", "device_id": "d1", "ts": shifted, "metrics": {"t": 1.0}}
    )
    assert seam.admit(frame) is None


def test_the_seam_expires_after_its_window() -> None:
    clock = Clock()
    seam = Seam(30.0, clock=clock)
    seam.add([reading("d1", T0, t=1.0)])
    clock.now += 29.0
    assert not seam.expired
    clock.now += 2.0
    assert seam.expired
