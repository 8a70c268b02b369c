from __future__ import annotations

from datetime import UTC, datetime, timedelta

from iot_ingest.rules import Rule, RuleEngine

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
T = "00000000-0000-0000-0000-00000000000a"
OTHER = "00000000-0000-0000-0000-00000000000b"


def feed(engine: RuleEngine, values: list[float], device: str = "d1", step: float = 1.0) -> list[str]:
    kinds = []
    for i, value in enumerate(values):
        ts = T0 + timedelta(seconds=i * step)
        kinds += [t.kind for t in engine.evaluate(T, device, "sensor", ts, {"temperature": value})]
    return kinds


def test_an_alert_opens_once_while_the_condition_holds_and_resolves_when_it_clears() -> None:
    engine = RuleEngine([Rule("r1", T, "temperature", ">", 30.0, device_id="d1")])
    assert feed(engine, [20, 31, 35, 40, 29]) == ["open", "resolve"]


def test_hysteresis_stops_a_flapping_value_from_opening_a_storm() -> None:
    engine = RuleEngine([Rule("r1", T, "temperature", ">", 30.0, device_id="d1", hysteresis=2.0)])
    flapping = [29.5, 30.5] * 20
    assert feed(engine, flapping) == ["open"]
    assert feed(engine, [27.9]) == ["resolve"]


def test_for_seconds_needs_the_condition_to_hold_that_long() -> None:
    engine = RuleEngine([Rule("r1", T, "temperature", ">", 30.0, device_id="d1", for_seconds=5)])
    assert feed(engine, [31, 31, 31, 20, 31, 31]) == []
    assert feed(engine, [31] * 7) == ["open"]


def test_type_rules_apply_to_every_device_of_that_type_separately() -> None:
    engine = RuleEngine([Rule("r1", T, "temperature", "<", 0.0, device_type="sensor")])
    assert feed(engine, [-1], device="a") == ["open"]
    assert feed(engine, [-1], device="b") == ["open"]
    assert engine.evaluate(T, "c", "other", T0, {"temperature": -5}) == []


def test_text_values_and_missing_metrics_are_ignored() -> None:
    engine = RuleEngine([Rule("r1", T, "temperature", "==", 1.0, device_id="d1")])
    assert engine.evaluate(T, "d1", None, T0, {"temperature": "on"}) == []
    assert engine.evaluate(T, "d1", None, T0, {"humidity": 1.0}) == []


def test_an_alert_opened_elsewhere_is_resolved_here() -> None:
    engine = RuleEngine([Rule("r1", T, "temperature", ">", 30.0, device_id="d1")], open_alerts={("r1", "d1")})
    assert feed(engine, [35, 20]) == ["resolve"]


def test_removing_a_rule_forgets_its_state() -> None:
    engine = RuleEngine([Rule("r1", T, "temperature", ">", 30.0, device_id="d1")])
    assert feed(engine, [35]) == ["open"]
    engine.replace_rules([])
    assert engine.open_alerts == set()
    assert feed(engine, [20, 40]) == []


def test_for_seconds_rules_report_when_their_wait_starts_and_is_reset() -> None:
    engine = RuleEngine([Rule("r1", T, "temperature", ">", 30.0, device_id="d1", for_seconds=5)])
    notes = []
    for i, value in enumerate([31, 31, 20, 20, 31]):
        ts = T0 + timedelta(seconds=i)
        notes += [t.kind for t in engine.evaluate_all(T, "d1", None, ts, {"temperature": value})]
    assert notes == ["pending", "clear", "pending"]


def test_a_replica_that_saw_the_wait_start_elsewhere_opens_on_time() -> None:
    """Readings of one device alternate between replicas: a's wait started on b counts on a."""
    a = RuleEngine([Rule("r1", T, "temperature", ">", 30.0, device_id="d1", for_seconds=5)])
    a.apply_remote("pending", "r1", "d1", T0)
    assert a.evaluate(T, "d1", None, T0 + timedelta(seconds=5), {"temperature": 31}) != []


def test_a_clear_seen_elsewhere_resets_the_wait() -> None:
    a = RuleEngine([Rule("r1", T, "temperature", ">", 30.0, device_id="d1", for_seconds=5)])
    assert a.evaluate(T, "d1", None, T0, {"temperature": 31}) == []
    a.apply_remote("clear", "r1", "d1", T0 + timedelta(seconds=2))
    assert a.evaluate(T, "d1", None, T0 + timedelta(seconds=5), {"temperature": 31}) == []


def test_an_alert_opened_and_resolved_elsewhere_is_followed_here() -> None:
    engine = RuleEngine([Rule("r1", T, "temperature", ">", 30.0, device_id="d1")])
    engine.apply_remote("open", "r1", "d1", T0)
    assert feed(engine, [35]) == []
    engine.apply_remote("resolve", "r1", "d1", T0)
    assert feed(engine, [35]) == ["open"]


def test_open_alerts_from_the_database_replace_the_local_view() -> None:
    engine = RuleEngine([Rule("r1", T, "temperature", ">", 30.0, device_id="d1")])
    assert feed(engine, [35]) == ["open"]
    engine.set_open_alerts([("r1", "d2"), ("gone", "d1")])
    assert engine.open_alerts == {("r1", "d2")}
    assert feed(engine, [36]) == ["open"]


def test_notes_about_unknown_rules_are_ignored() -> None:
    engine = RuleEngine([Rule("r1", T, "temperature", ">", 30.0, device_id="d1")])
    engine.apply_remote("open", "other", "d1", T0)
    assert engine.open_alerts == set()


def test_rules_of_a_tenant_see_only_its_devices() -> None:
    by_type = Rule("r-type", T, "temperature", ">", 30.0, device_type="sensor")
    every_device = Rule("r-all", T, "temperature", ">", 30.0)  # no device filter: every device of T
    named = Rule("r-named", T, "temperature", ">", 30.0, device_id="d9")
    engine = RuleEngine([by_type, every_device, named])
    # The same device type, and even the same device id, in another tenant: no rule of T applies.
    assert engine.evaluate(OTHER, "d9", "sensor", T0, {"temperature": 99}) == []
    opened = engine.evaluate(T, "d9", "sensor", T0, {"temperature": 99})
    assert sorted(t.rule.id for t in opened) == ["r-all", "r-named", "r-type"]
    assert [t.rule.id for t in engine.evaluate(T, "d2", "other", T0, {"temperature": 99})] == ["r-all"]
