"""Payload parsing and validation of the ingest service: every accepted shape and every reject reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from iot_ingest.payload import Limits, Reject, oldest_accepted, parse_status, parse_telemetry

NOW = datetime(2026, 3, 10, 12, 0, 0, tzinfo=UTC)
LIMITS = Limits()


def parse(payload: bytes | str, limits: Limits = LIMITS):  # type: ignore[no-untyped-def]
    data = payload.encode() if isinstance(payload, str) else payload
    return parse_telemetry("dev-1", data, NOW, limits)


def reasons(payload: bytes | str, limits: Limits = LIMITS) -> list[str]:
    return [r.reason for r in parse(payload, limits).rejects]


def test_flat_form_gets_the_time_of_receipt() -> None:
    parsed = parse('{"temperature": 21.5, "humidity": 40}')
    assert parsed.rejects == []
    [reading] = parsed.readings
    assert reading.device_id == "dev-1"
    assert reading.ts == NOW
    assert reading.metrics == {"temperature": 21.5, "humidity": 40.0}
    assert all(isinstance(v, float) for v in reading.metrics.values())


def test_nested_form_with_rfc3339_timestamp_is_normalized_to_utc() -> None:
    [reading] = parse('{"ts": "2026-03-10T13:00:00.250+02:00", "metrics": {"t": 1}}').readings
    assert reading.ts == datetime(2026, 3, 10, 11, 0, 0, 250000, tzinfo=UTC)
    assert reading.ts.tzinfo is UTC


def test_epoch_milliseconds_and_z_suffix() -> None:
    ms = int((NOW - timedelta(minutes=5)).timestamp() * 1000) + 7
    [a] = parse(f'{{"ts": {ms}, "t": 1}}').readings
    assert a.ts == NOW - timedelta(minutes=5) + timedelta(milliseconds=7)
    [b] = parse('{"ts": "2026-03-10T11:59:00Z", "t": 1}').readings
    assert b.ts == datetime(2026, 3, 10, 11, 59, tzinfo=UTC)


def test_booleans_become_numbers_and_short_text_is_kept() -> None:
    [reading] = parse('{"door": true, "alarm": false, "state": "ok"}').readings
    assert reading.metrics == {"door": 1.0, "alarm": 0.0, "state": "ok"}


def test_array_keeps_the_good_readings_and_rejects_the_bad_with_their_index() -> None:
    parsed = parse(
        '[{"t": 1}, {"t": "x" }, {"t": null}, {"ts": "2026-03-10T11:00:00Z", "metrics": {"t": 3}}, 5]'
    )
    assert [r.metrics["t"] for r in parsed.readings] == [1.0, "x", 3.0]
    assert parsed.rejects == [
        Reject("invalid_value", "[2] t: expected a number, boolean or text, got null"),
        Reject("invalid_shape", "[4] expected an object, got number"),
    ]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("{not json", "malformed_json"),
        ("", "malformed_json"),
        ('"text"', "invalid_shape"),
        ("42", "invalid_shape"),
        ('{"metrics": [1, 2]}', "invalid_shape"),
        ('{"metrics": {"t": 1}, "extra": 2}', "invalid_shape"),
        ("{}", "empty_reading"),
        ('{"ts": 1}', "empty_reading"),
        ("[]", "empty_reading"),
        ('{"t": NaN}', "non_finite_value"),
        ('{"t": Infinity}', "non_finite_value"),
        ('{"t": -Infinity}', "non_finite_value"),
        ('{"t": 1e999}', "non_finite_value"),
        ('{"t": {"nested": 1}}', "invalid_value"),
        ('{"t": [1]}', "invalid_value"),
        ('{"1abc": 1}', "invalid_metric_name"),
        ('{"a b": 1}', "invalid_metric_name"),
        ('{"a/b": 1}', "invalid_metric_name"),
        ('{"ts": "yesterday", "t": 1}', "invalid_timestamp"),
        ('{"ts": "2026-03-10T11:00:00", "t": 1}', "invalid_timestamp"),
        ('{"ts": true, "t": 1}', "invalid_timestamp"),
        ('{"ts": 1e300, "t": 1}', "invalid_timestamp"),
        ('{"ts": "2026-03-10T13:00:00Z", "t": 1}', "timestamp_in_future"),
        ('{"ts": "2020-01-01T00:00:00Z", "t": 1}', "timestamp_too_old"),
        ('{"t": "' + "x" * 65 + '"}', "text_too_long"),
    ],
)
def test_each_invalid_payload_is_rejected_with_its_reason(payload: str, reason: str) -> None:
    parsed = parse(payload)
    assert parsed.readings == []
    assert [r.reason for r in parsed.rejects] == [reason]
    assert parsed.rejects[0].detail


def test_size_and_count_limits() -> None:
    limits = Limits(max_payload_bytes=100, max_readings=2, max_metrics=2)
    assert reasons('{"a": 1, "b": 2, "c": 3}', limits) == ["too_many_metrics"]
    assert reasons('[{"a": 1}, {"a": 2}, {"a": 3}]', limits) == ["too_many_readings"]
    assert reasons('{"a": "' + "x" * 100 + '"}', limits) == ["payload_too_large"]
    assert reasons('{"a": 1, "b": 2}', limits) == []


def test_the_oldest_accepted_instant_is_the_start_of_the_oldest_partition_day() -> None:
    assert oldest_accepted(NOW, 30) == datetime(2026, 2, 8, tzinfo=UTC)
    assert reasons('{"ts": "2026-02-08T00:00:00Z", "t": 1}') == []
    assert reasons('{"ts": "2026-02-07T23:59:59.999Z", "t": 1}') == ["timestamp_too_old"]
    assert reasons('{"ts": "2026-03-10T12:10:00Z", "t": 1}') == []


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"online", "online"),
        (b"OFFLINE\n", "offline"),
        (b'"online"', "online"),
        (b'{"status": "offline"}', "offline"),
    ],
)
def test_status_payloads(payload: bytes, status: str) -> None:
    assert parse_status(payload, LIMITS) == status


@pytest.mark.parametrize("payload", [b"", b"maybe", b'{"status": 1}', b"[1]"])
def test_invalid_status_payloads(payload: bytes) -> None:
    result = parse_status(payload, LIMITS)
    assert isinstance(result, Reject)
    assert result.reason == "invalid_status"
