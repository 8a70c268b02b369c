"""The simulator's pure parts: its answers to commands, its spikes and the demo alert rule."""

from __future__ import annotations

import msgspec
import pytest

from iot_common.alerts import AlertRuleDefinition
from iot_common.commands import decode_ack
from iot_common.messages import CommandMessage
from iot_common.state import DesiredMessage, ReportedMessage, decode_reported
from iot_ingest.rules import Rule
from iot_sim.commands import SimulatedDevice, answer, encode_ack
from iot_sim.demo import DEVICE_TYPE, demo_rule
from iot_sim.main import parse_args
from iot_sim.model import fleet
from iot_sim.state import apply_desired, encode_report

COMMAND_ID = "0b0e4f8e-7e53-4d6e-8a43-6f3c1c6d2a10"


def device() -> SimulatedDevice:
    return SimulatedDevice("sim-0000", fleet(1, 3, 1, 0.0)[0], interval_s=1.0, next_due=100.0, booted_at=40.0)


def command(name: str, **params: object) -> bytes:
    return msgspec.json.encode(CommandMessage(COMMAND_ID, name, dict(params)))


def test_known_commands_are_acknowledged_with_a_result_ingest_reads() -> None:
    sim = device()
    ping = answer(sim, command("ping"), now=50.0)
    assert ping is not None
    ack = decode_ack(encode_ack(ping))
    assert (ack.id, ack.status, ack.error) == (COMMAND_ID, "ok", None)
    assert ack.result == {"pong": True, "uptime_s": 10.0, "interval_s": 1.0}

    sim.model.sample()
    assert sim.model.offsets
    reboot = answer(sim, command("reboot", delay=1), now=60.0)
    assert reboot is not None
    assert reboot.status == "ok"
    assert reboot.result == {"rebooted": True, "uptime_s": 20.0}
    assert (sim.booted_at, sim.model.offsets) == (60.0, {})


def test_set_interval_changes_when_the_device_publishes() -> None:
    sim = device()
    faster = answer(sim, command("set_interval", interval_s=0.25), now=99.0)
    assert faster is not None
    assert faster.result == {"interval_s": 0.25, "previous_s": 1.0}
    assert (sim.interval_s, sim.next_due) == (0.25, 99.25)  # a shorter interval applies at once
    slower = answer(sim, command("set_interval", interval_s=60), now=99.1)
    assert slower is not None
    assert slower.status == "ok"
    assert (sim.interval_s, sim.next_due) == (60.0, 99.25)  # a longer one after the reading already due


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (command("self_destruct"), "unknown command 'self_destruct' (known: ping, reboot, set_interval)"),
        (command("set_interval"), "set_interval needs params.interval_s, 0.01 to 86400 seconds"),
        (
            command("set_interval", interval_s=0),
            "set_interval needs params.interval_s, 0.01 to 86400 seconds",
        ),
        (
            command("set_interval", interval_s="5"),
            "set_interval needs params.interval_s, 0.01 to 86400 seconds",
        ),
        (
            command("set_interval", interval_s=True),
            "set_interval needs params.interval_s, 0.01 to 86400 seconds",
        ),
        (b'{"id": "' + COMMAND_ID.encode() + b'", "name": 7}', "malformed command: Expected `str`"),
    ],
)
def test_anything_else_is_answered_failed_with_the_reason(payload: bytes, error: str) -> None:
    sim = device()
    ack = answer(sim, payload, now=50.0)
    assert ack is not None
    assert (ack.id, ack.status, ack.result) == (COMMAND_ID, "error", None)
    assert ack.error is not None
    assert ack.error.startswith(error)
    assert sim.interval_s == 1.0


@pytest.mark.parametrize("payload", [b"not json", b"{}", b'{"name": "ping"}', b"\xff"])
def test_a_payload_without_a_command_id_gets_no_answer(payload: bytes) -> None:
    assert answer(device(), payload, now=50.0) is None


def test_the_demo_rule_is_a_valid_request_that_spikes_trip_and_nothing_else() -> None:
    body = msgspec.convert(demo_rule(), AlertRuleDefinition)
    assert (body.device_type, body.metric) == (DEVICE_TYPE, "temperature")
    rule = Rule("demo", "tenant", body.metric, body.op, body.threshold, hysteresis=body.hysteresis)
    calm = [m.sample()["temperature"] for m in fleet(20, 3, 7, 0.0) for _ in range(500)]
    assert not [v for v in calm if rule.holds(v)]
    assert all(rule.cleared(v) for v in calm)
    spiky = [m.sample()["temperature"] for m in fleet(20, 3, 7, 0.05) for _ in range(100)]
    assert 0 < len([v for v in spiky if rule.holds(v)]) < len(spiky) / 10


def test_spike_probability_is_a_probability() -> None:
    assert parse_args(["--spike-probability", "0.3"]).spike_probability == 0.3
    for bad in ("-0.1", "1.5"):
        with pytest.raises(SystemExit):
            parse_args(["--spike-probability", bad])
    with pytest.raises(SystemExit):
        parse_args(["--seed-demo-rule", "--api-key", ""])


def desired(version: int, **values: object) -> bytes:
    return msgspec.json.encode(DesiredMessage(version, dict(values), dict(values)))


def test_desired_target_temperature_steers_the_temperature_and_is_reported() -> None:
    sim = device()
    before = [sim.model.sample()["temperature"] for _ in range(5)]
    assert all(15 < t < 27 for t in before)
    report = apply_desired(sim, desired(3, target_temperature=60, colour="blue"))
    assert report == ReportedMessage({"target_temperature": 60}, 3)
    assert decode_reported(encode_report(report)) == report  # what ingest reads
    after = [sim.model.sample()["temperature"] for _ in range(80)]
    assert after[-1] > 55, after[-10:]
    # The same version again (retained on subscribe, then re-published on online), or an older one: ignored.
    assert apply_desired(sim, desired(3, target_temperature=10)) is None
    assert apply_desired(sim, desired(2, target_temperature=10)) is None
    assert apply_desired(sim, b"not json") is None
    # Out of range: not applied, not reported (it stays in the delta).
    assert apply_desired(sim, desired(4, target_temperature=1e9)) == ReportedMessage({}, 4)
    # Removed from desired: the target is dropped and reported removed.
    assert apply_desired(sim, desired(5)) == ReportedMessage({"target_temperature": None}, 5)
    assert "temperature" not in sim.model.targets
