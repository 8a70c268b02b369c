"""Ingest's side of device state, pure parts: translating a report, planning it, online devices."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from iot_common.state import ReportedMessage
from iot_ingest.consumer import translate
from iot_ingest.payload import Limits
from iot_ingest.plan import Refusal, plan_batch

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LIMITS = Limits()
TOPIC = "devices/state/dev-1/reported"


def test_a_report_is_translated() -> None:
    delivery = translate(TOPIC, b'{"reported": {"target_temperature": 21}, "version": 4}', NOW, LIMITS)
    assert delivery.device_id == "dev-1"
    assert delivery.rejects == []
    assert delivery.report == ReportedMessage({"target_temperature": 21}, 4)
    assert delivery.needs_device


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "malformed_json"),
        (b'{"reported": [1]}', "invalid_state_report"),
        (b'{"reported": {}, "extra": 1}', "invalid_state_report"),
        (b'{"reported": {}, "version": -2}', "invalid_state_report"),
        (b'{"reported": ' + b'{"a":' * 20 + b"1" + b"}" * 20 + b"}", "too_deep"),
        (b'{"reported": {"a": "' + b"x" * 20_000 + b'"}}', "payload_too_large"),
        (b'{"reported": {"a": "\\u0000"}}', "invalid_state_report"),
    ],
)
def test_malformed_reports_are_dead_letters_with_a_reason(payload: bytes, reason: str) -> None:
    delivery = translate(TOPIC, payload, NOW, LIMITS)
    assert delivery.report is None
    assert [r.reason for r in delivery.rejects] == [reason]
    plan = plan_batch([delivery], {}, {"dev-1": "t"})
    assert [d.reason for d in plan.dead_letters] == [reason]
    assert plan.reports == []


def test_reports_are_planned_in_order_and_refused_devices_dead_lettered() -> None:
    first = translate(TOPIC, b'{"reported": {"a": 1}}', NOW, LIMITS)
    second = translate(TOPIC, b'{"reported": {"a": 2}}', NOW, LIMITS)
    plan = plan_batch([first, second], {}, {"dev-1": "t"})
    assert [(d, r.reported) for d, r, _ in plan.reports] == [("dev-1", {"a": 1}), ("dev-1", {"a": 2})]
    assert plan.last_seen == {"dev-1": NOW}
    refused = plan_batch([first], {"dev-1": Refusal("unknown_device", "not registered")}, {})
    assert refused.reports == []
    assert [d.reason for d in refused.dead_letters] == ["unknown_device"]
