"""Shared helpers of alerts and commands: action shapes, command acks and payloads."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from iot_common.alerts import CommandAction, InvalidAction, WebhookAction, alert_event, parse_action
from iot_common.commands import InvalidAck, ack_columns, command_event, command_publication, decode_ack
from iot_common.messages import CommandAck, decode_event, encode_event

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
CMD_ID = "0b0e4f8e-7e53-4d6e-8a43-6f3c1c6d2a10"


def test_action_shapes_are_parsed_with_their_defaults() -> None:
    assert parse_action(None) is None
    hook = parse_action(
        {"type": "webhook", "url": "https://hooks.example.com/x", "headers": {"X-Token": "t"}}
    )
    assert hook == WebhookAction("https://hooks.example.com/x", {"X-Token": "t"}, ["open"])
    command = parse_action(
        {"type": "command", "name": "fan_on", "params": {"speed": 3}, "on": ["open", "resolve"]}
    )
    assert command == CommandAction("fan_on", {"speed": 3}, None, ["open", "resolve"])


@pytest.mark.parametrize(
    "document",
    [
        {"type": "email", "to": "a@b"},
        {"type": "webhook", "url": "ftp://x"},
        {"type": "webhook", "url": "http://x", "extra": 1},
        {"type": "command"},
        {"type": "command", "name": "x", "on": ["ack"]},
        {"type": "webhook", "url": "http://x", "headers": {"bad header": "v"}},
    ],
)
def test_invalid_actions_are_refused(document: dict[str, object]) -> None:
    with pytest.raises(InvalidAction):
        parse_action(document)


def test_acks_are_decoded_and_malformed_ones_refused() -> None:
    ack = decode_ack(json.dumps({"id": CMD_ID, "status": "error", "error": "busy"}).encode())
    assert ack == CommandAck(CMD_ID, "error", None, "busy")
    for payload in [
        b"{",
        b'{"status": "ok"}',
        b'{"id": "42"}',
        json.dumps({"id": CMD_ID, "status": "x"}).encode(),
    ]:
        with pytest.raises(InvalidAck):
            decode_ack(payload)


def test_the_first_ack_of_a_command_wins() -> None:
    acks = [("d1", CommandAck(CMD_ID, "ok", {"a": 1})), ("d1", CommandAck(CMD_ID, "error", None, "late"))]
    assert ack_columns(acks) == ([CMD_ID], ["d1"], ["acked"], ['{"a":1}'], [None])


def test_command_rows_become_payloads_and_events() -> None:
    row = {
        "id": CMD_ID,
        "device_id": "d1",
        "name": "reboot",
        "params": {"delay": 5},
        "state": "sent",
        "result": None,
        "error": None,
        "updated_at": T0,
        "expires_at": T0,
    }
    topic, payload = command_publication("d1", row)
    assert topic == "devices/commands/d1"
    assert json.loads(payload) == {
        "id": CMD_ID,
        "name": "reboot",
        "params": {"delay": 5},
        "expires_at": "2026-11-26T12:00:00Z",
    }
    event = command_event(row)
    assert decode_event(encode_event(event)) == event
    assert json.loads(encode_event(event))["type"] == "command"


def test_alert_rows_become_events() -> None:
    row = {
        "id": CMD_ID,
        "rule_id": CMD_ID,
        "device_id": "d1",
        "metric": "t",
        "severity": "warning",
        "state": "open",
        "message": "",
        "value": 31.0,
        "threshold": 30.0,
        "opened_at": T0,
        "resolved_at": None,
        "acked_at": None,
    }
    assert json.loads(encode_event(alert_event(row)))["type"] == "alert"
