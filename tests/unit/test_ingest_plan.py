"""What a batch becomes in the database: dead letters, unknown devices, last seen, status, latest values."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import msgspec

from iot_common.messages import CommandAck, LatestValue, Reading
from iot_ingest.consumer import translate
from iot_ingest.payload import Limits, Reject
from iot_ingest.plan import (
    PAYLOAD_EXCERPT_CHARS,
    Delivery,
    Plan,
    Refusal,
    latest_values,
    plan_batch,
    ts_sort_key,
)
from iot_ingest.telemetry import telemetry_columns

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
ACME, GLOBEX = "00000000-0000-0000-0000-00000000000a", "00000000-0000-0000-0000-00000000000b"
TENANTS = {"a": ACME, "b": GLOBEX, "c": GLOBEX, "d1": ACME}
UNKNOWN_B = {"b": Refusal("unknown_device", "device 'b' is not registered")}


def reading(device: str, seconds: int, **metrics: float | str) -> Reading:
    return Reading(device, T0 + timedelta(seconds=seconds), dict(metrics))


def test_unknown_devices_become_dead_letters_and_rejects_are_kept() -> None:
    batch = [
        Delivery("devices/telemetry/a", "a", T0, b'{"t": 1}', [reading("a", 0, t=1)]),
        Delivery("devices/telemetry/b", "b", T0, b'{"t": 2}', [reading("b", 0, t=2)]),
        Delivery("devices/telemetry/a", "a", T0, b"{", rejects=[Reject("malformed_json", "x")]),
    ]
    plan = plan_batch(batch, UNKNOWN_B, {"a": ACME})
    assert [r.device_id for r in plan.readings] == ["a"]
    assert sorted((d.device_id, d.reason, d.tenant_id) for d in plan.dead_letters) == [
        ("a", "malformed_json", ACME),
        ("b", "unknown_device", None),  # no tenant: only platform admins see it
    ]
    assert plan.last_seen == {"a": T0}
    assert plan.tenants == {"a": ACME}


def test_a_device_refused_registration_is_dead_lettered_in_the_name_of_its_tenant() -> None:
    detail = "device not registered: tenant 'globex' has reached its limit of 10 devices"
    refused = {"new": Refusal("tenant_quota", detail, GLOBEX)}
    batch = [Delivery("devices/telemetry/new", "new", T0, b'{"t": 1}', [reading("new", 0, t=1)])]
    plan = plan_batch(batch, refused, TENANTS)
    assert plan.readings == []
    assert [(d.reason, d.detail, d.tenant_id) for d in plan.dead_letters] == [
        ("tenant_quota", detail, GLOBEX)
    ]


def test_last_status_wins_and_offline_does_not_count_as_seen() -> None:
    later = T0 + timedelta(seconds=5)
    batch = [
        Delivery("devices/status/a", "a", T0, b"online", status="online"),
        Delivery("devices/status/a", "a", later, b"offline", status="offline"),
    ]
    plan = plan_batch(batch, {}, TENANTS)
    assert plan.statuses == {"a": ("offline", later)}
    assert plan.last_seen == {"a": T0}


def test_dead_letter_payload_is_truncated_and_safe_for_postgres() -> None:
    payload = b"\x00" + b"x" * 5000 + b"\xff"
    plan = plan_batch([Delivery("t", None, T0, payload, rejects=[Reject("invalid_topic", "t")])], {}, TENANTS)
    [letter] = plan.dead_letters
    assert letter.payload_size == len(payload)
    assert "\x00" not in letter.payload
    assert len(letter.payload) <= PAYLOAD_EXCERPT_CHARS + 6


def test_latest_values_keep_the_newest_reading_per_metric() -> None:
    latest = latest_values([reading("a", 10, t=1, h=5), reading("a", 5, t=2), reading("b", 0, t=3)])
    assert latest == {
        "a": {"t": (T0 + timedelta(seconds=10), 1), "h": (T0 + timedelta(seconds=10), 5)},
        "b": {"t": (T0, 3)},
    }


def test_sort_keys_order_like_the_instants() -> None:
    stamps = [T0, T0 + timedelta(microseconds=1), T0 + timedelta(seconds=1), T0 + timedelta(days=400)]
    keys = [ts_sort_key(ts) for ts in stamps]
    assert keys == sorted(keys)
    assert ts_sort_key(T0) == "2026-03-10T12:00:00000000"
    # Another zone: the same instant, the same key.
    assert ts_sort_key(T0.astimezone(timezone(timedelta(hours=5, minutes=30)))) == ts_sort_key(T0)


def test_sort_key_is_the_one_the_redis_script_derives_from_the_stored_value() -> None:
    """The latest-values script compares this key with one it takes from the stored LatestValue's ``ts``
    (4-digit year, seconds, the fraction padded to 6 digits): the two must agree, early years included."""

    def scripts_key(ts: datetime) -> str:
        stored = msgspec.json.decode(msgspec.json.encode(LatestValue(1.0, ts)))["ts"]
        match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.?(\d*)", stored)
        assert match is not None, stored
        return match[1] + (match[2] + "000000")[:6]

    early = (datetime(1, 1, 1, tzinfo=UTC), datetime(999, 5, 6, 7, 8, 9, 5, tzinfo=UTC))
    for ts in (T0, T0 + timedelta(microseconds=120), *early):
        assert ts_sort_key(ts) == scripts_key(ts)


def test_translate_routes_topics() -> None:
    limits = Limits()
    tele = translate("devices/telemetry/dev-1", b'{"t": 1}', T0, limits)
    assert tele.device_id == "dev-1"
    assert len(tele.readings) == 1
    status = translate("devices/status/dev-1", b"online", T0, limits)
    assert status.status == "online"
    assert status.readings == []
    other = translate("devices/telemetry/bad id", b"{}", T0, limits)
    assert other.device_id is None
    assert [r.reason for r in other.rejects] == ["invalid_topic"]


def test_command_acks_are_planned_and_malformed_ones_dead_lettered() -> None:
    good = b'{"id": "0b0e4f8e-7e53-4d6e-8a43-6f3c1c6d2a10", "status": "ok"}'
    ok = translate("devices/commands/d1/ack", good, T0, Limits())
    bad = translate("devices/commands/d1/ack", b'{"status": "ok"}', T0, Limits())
    plan = plan_batch([ok, bad], {}, TENANTS)
    assert plan.acks == [("d1", CommandAck("0b0e4f8e-7e53-4d6e-8a43-6f3c1c6d2a10"))]
    assert [d.reason for d in plan.dead_letters] == ["invalid_command_ack"]
    assert plan.readings == []


def test_telemetry_columns_make_one_row_per_metric() -> None:
    readings = [
        Reading("a", T0, {"t": 1.0, "ok": "yes"}),
        Reading("b", T0, {"t": 2}),
    ]
    devices, metrics, stamps, values, texts = telemetry_columns(readings)
    assert devices == ["a", "a", "b"]
    assert metrics == ["t", "ok", "t"]
    assert stamps == [T0, T0, T0]
    assert values == [1.0, None, 2.0]
    assert texts == [None, "yes", None]


def test_plans_of_single_messages_merge_into_the_plan_of_the_batch() -> None:
    later = T0 + timedelta(seconds=5)
    ack = CommandAck("0b7e4c57-5f43-4b7e-9a2c-3c1f1d2f0e11", "ok")
    batch = [
        Delivery("devices/telemetry/a", "a", T0, b'{"t": 1}', [reading("a", 0, t=1)]),
        Delivery("devices/status/a", "a", later, b"offline", status="offline"),
        Delivery("devices/telemetry/b", "b", T0, b"{", rejects=[Reject("malformed_json", "x")]),
        Delivery("devices/commands/b/ack", "b", later, b"{}", ack=ack),
        Delivery("devices/telemetry/c", "c", later, b'{"t": 3}', [reading("c", 5, t=3)]),
    ]
    merged = Plan()
    for delivery in batch:
        one = plan_batch([delivery], {"c": Refusal("unknown_device", "no")}, TENANTS)
        one.new_rows = len(one.readings)
        merged.merge(one)
    whole = plan_batch(batch, {"c": Refusal("unknown_device", "no")}, TENANTS)
    whole.new_rows = 1
    assert merged == whole


def test_a_redelivered_reading_is_stored_once_and_not_published_again() -> None:
    old = Reading("d", datetime(2026, 1, 1, tzinfo=UTC), {"t": 1.0})
    new = Reading("d", datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC), {"t": 2.0})
    plan = Plan(readings=[old, new])
    assert plan.published() == [old, new]
    plan.fresh = {("d", new.ts)}
    assert plan.published() == [new]
    # A later part of the batch, written on its own with every reading new, keeps them all.
    other = Plan(readings=[Reading("e", old.ts, {"t": 3.0})])
    plan.merge(other)
    assert plan.published() == [new, other.readings[0]]


def test_a_redelivered_message_is_published_even_if_its_rows_were_stored() -> None:
    # Its first delivery may have been committed by a replica killed before publishing it.
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    delivery = Delivery("devices/telemetry/d", "d", ts, b"{}", readings=[Reading("d", ts, {"t": 1.0})])
    delivery.redelivered = True
    plan = plan_batch([delivery], {}, {"d": "tenant"})
    plan.fresh = set()
    assert plan.published() == delivery.readings
