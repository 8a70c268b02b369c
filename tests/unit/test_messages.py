from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from iot_common.messages import (
    AlertEvent,
    StatusEvent,
    TelemetryEvent,
    decode_event,
    encode_event,
)

TS = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def test_events_carry_their_type_tag_on_the_wire() -> None:
    event = TelemetryEvent(device_id="dev-1", ts=TS, metrics={"temperature": 21.5, "state": "ok"})
    wire = msgspec.json.decode(encode_event(event))
    assert wire == {
        "type": "telemetry",
        "device_id": "dev-1",
        "ts": "2026-11-26T12:00:00Z",
        "metrics": {"temperature": 21.5, "state": "ok"},
    }
    assert decode_event(encode_event(event)) == event


def test_decoding_picks_the_struct_by_tag() -> None:
    status = StatusEvent(device_id="dev-1", status="offline", ts=TS)
    alert = AlertEvent(
        id="a1",
        rule_id="r1",
        device_id="dev-1",
        metric="temperature",
        severity="critical",
        state="open",
        message="too hot",
        value=99.0,
        threshold=80.0,
        opened_at=TS,
    )
    assert decode_event(encode_event(status)) == status
    assert decode_event(encode_event(alert)) == alert


def test_an_unknown_event_type_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_event(b'{"type": "bogus", "device_id": "x"}')
