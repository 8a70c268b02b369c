"""Messages that must never make the ingest handler raise: each becomes a dead letter with a reason.

A handler that raises sends no PUBACK, so the message holds one slot of the broker's in-flight window
for as long as the connection lasts: a few thousand such messages stop ingestion for every device.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from iot_common.settings import load_settings
from iot_ingest import consumer as consumer_module
from iot_ingest import metrics
from iot_ingest.batcher import Batcher
from iot_ingest.consumer import Consumer, DeviceQuota, default_client_id, translate
from iot_ingest.payload import Limits, parse_telemetry
from iot_ingest.plan import Delivery
from iot_ingest.settings import IngestSettings

NOW = datetime(2026, 3, 10, 12, 0, 0, tzinfo=UTC)
LIMITS = Limits()
DEEP_ARRAY = b"[" * 1100 + b"]" * 1100
DEEP_OBJECT = b'{"a":' * 1100 + b"1" + b"}" * 1100
ACK_ID = "0b7e4c57-5f43-4b7e-9a2c-3c1f1d2f0e11"


def reasons_of(delivery: Delivery) -> list[str]:
    return [r.reason for r in delivery.rejects]


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("devices/telemetry/dev-1", b'{"s":"\xff"}', "malformed_json"),
        ("devices/telemetry/dev-1", b'{"t": 1, "s": "\xc3"}', "malformed_json"),
        ("devices/telemetry/dev-1", DEEP_ARRAY, "too_deep"),
        ("devices/telemetry/dev-1", DEEP_OBJECT, "too_deep"),
        ("devices/status/dev-1", b'{"status":"\xff"}', "malformed_json"),
        ("devices/status/dev-1", b'"\xff"', "malformed_json"),
        ("devices/status/dev-1", DEEP_OBJECT, "too_deep"),
        ("devices/commands/dev-1/ack", b'{"id":"\xff"}', "malformed_json"),
        ("devices/commands/dev-1/ack", b'{"id":"%s","status":"\xff"}' % ACK_ID.encode(), "malformed_json"),
        ("devices/commands/dev-1/ack", DEEP_OBJECT, "too_deep"),
    ],
)
def test_invalid_utf8_and_deep_nesting_are_dead_letters_on_every_topic(
    topic: str, payload: bytes, reason: str
) -> None:
    delivery = translate(topic, payload, NOW, LIMITS)
    assert reasons_of(delivery) == [reason]
    assert delivery.device_id == "dev-1"
    assert (delivery.readings, delivery.status, delivery.ack) == ([], None, None)


def test_an_unexpected_exception_while_translating_is_a_handler_error_dead_letter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*_: Any) -> Any:
        raise ZeroDivisionError("a fault of the code")

    monkeypatch.setattr(consumer_module, "parse_telemetry", broken)
    counter = metrics.HANDLER_ERRORS.labels("translate")
    before = counter._value.get()
    delivery = translate("devices/telemetry/dev-1", b'{"t": 1}', NOW, LIMITS)
    assert reasons_of(delivery) == ["handler_error"]
    assert "ZeroDivisionError" in delivery.rejects[0].detail
    assert delivery.device_id == "dev-1"
    assert counter._value.get() == before + 1


def test_metric_name_with_a_trailing_newline_is_refused() -> None:
    parsed = parse_telemetry("dev-1", b'{"tnl\\n": 1, "ok": 2}', NOW, LIMITS)
    assert parsed.readings == []
    assert [r.reason for r in parsed.rejects] == ["invalid_metric_name"]


def test_device_id_with_a_trailing_newline_is_an_invalid_topic() -> None:
    delivery = translate("devices/telemetry/x\n", b'{"t": 1}', NOW, LIMITS)
    assert reasons_of(delivery) == ["invalid_topic"]
    assert delivery.readings == []


@pytest.mark.parametrize("text", ["a\\u0000b", "\\ud800"])
def test_text_postgresql_cannot_store_is_an_invalid_value(text: str) -> None:
    parsed = parse_telemetry("dev-1", b'{"t": "%s"}' % text.encode(), NOW, LIMITS)
    assert [r.reason for r in parsed.rejects] == ["invalid_value"]


@pytest.mark.parametrize(
    "topic", ["devices/telemetry/dev-1", "devices/status/dev-1", "devices/commands/dev-1/ack"]
)
def test_a_retained_message_is_a_dead_letter_not_a_new_reading(topic: str) -> None:
    delivery = translate(topic, b'{"t": 1}', NOW, LIMITS, retained=True)
    assert reasons_of(delivery) == ["retained"]
    assert delivery.device_id == "dev-1"
    assert delivery.readings == []


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_quota_lets_a_burst_through_then_the_rate_and_dead_letters_the_rest() -> None:
    clock = Clock()
    quota = DeviceQuota(10, 20, clock=clock)
    topic = "devices/telemetry/flood"
    sent = [translate(topic, b'{"t": %d}' % i, NOW, LIMITS, quota=quota) for i in range(30)]
    assert sum(1 for d in sent if d.readings) == 20
    assert [reasons_of(d) for d in sent[20:]] == [["rate_limited"]] * 10
    assert "10 readings/s" in sent[-1].rejects[0].detail
    # Another device has its own bucket.
    other = translate("devices/telemetry/calm", b'{"t": 1}', NOW, LIMITS, quota=quota)
    assert len(other.readings) == 1
    # One second later, ten more readings of the flooding device are accepted.
    clock.now += 1.0
    later = [translate(topic, b'{"t": 1}', NOW, LIMITS, quota=quota) for _ in range(11)]
    assert [bool(d.readings) for d in later] == [True] * 10 + [False]


def test_quota_counts_every_reading_of_a_batch_message() -> None:
    quota = DeviceQuota(1, 5, clock=Clock())
    batch = b"[" + b",".join(b'{"t": %d}' % i for i in range(6)) + b"]"
    delivery = translate("devices/telemetry/d", batch, NOW, LIMITS, quota=quota)
    assert reasons_of(delivery) == ["rate_limited"]
    assert delivery.readings == []
    assert len(translate("devices/telemetry/d", batch[:-10] + b"]", NOW, LIMITS, quota=quota).readings) == 5


def test_quota_counts_status_and_command_answers_too() -> None:
    quota = DeviceQuota(1, 2, clock=Clock())
    topics = ["devices/status/d", "devices/commands/d/ack", "devices/status/d"]
    sent = [translate(topic, b"online", NOW, LIMITS, quota=quota) for topic in topics]
    assert [reasons_of(d) for d in sent] == [[], ["invalid_command_ack"], ["rate_limited"]]


def test_quota_memory_is_bounded_and_idle_devices_are_forgotten() -> None:
    clock = Clock()
    quota = DeviceQuota(10, 20, max_devices=100, clock=clock)
    for i in range(1000):
        quota.take(f"d{i}", 1)
    assert len(quota) == 100
    clock.now += 3.0  # every bucket refilled (20 / 10 s/reading = 2 s): idle ones are evicted
    quota.take("new", 1)
    assert len(quota) == 1


def test_default_client_id_differs_by_share_group_and_database_and_is_stable() -> None:
    db_a = "postgresql://iot:secret@db.example:5432/iot_a"
    db_b = "postgresql://iot:secret@db.example:5432/iot_b"
    ids = {
        default_client_id("ingest", db_a),
        default_client_id("ingest-b", db_a),
        default_client_id("ingest", db_b),
        default_client_id("ingest", "postgresql://iot@other-host:5432/iot_a"),
    }
    assert len(ids) == 4
    assert default_client_id("ingest", db_a) == default_client_id("ingest", db_a)
    # The password is no part of the identity: rotating it keeps the session.
    assert default_client_id("ingest", db_a) == default_client_id("ingest", db_a.replace("secret", "new"))
    long_id = default_client_id("g" * 64, "postgresql://h/" + "d" * 200)
    assert len(long_id) <= 64
    assert all(c.isalnum() or c in "_.:-" for c in long_id)


def test_an_empty_share_group_subscribes_without_share_for_a_broker_lacking_shared_subscriptions() -> None:
    def consumer(group: str) -> Consumer:
        return Consumer(
            mqtt_url="mqtt://127.0.0.1:1",
            client_id="test-share",
            share_group=group,
            session_expiry_s=0,
            max_in_flight=10,
            batcher=Batcher(lambda items: None, max_size=10, max_delay=0.0),  # type: ignore[arg-type,return-value]
            limits=LIMITS,
        )

    assert [s.topic for s in consumer("g").subscriptions] == [
        "$share/g/devices/telemetry/+",
        "$share/g/devices/status/+",
        "$share/g/devices/commands/+/ack",
        "$share/g/devices/state/+/reported",
    ]
    assert [s.topic for s in consumer("").subscriptions] == [
        "devices/telemetry/+",
        "devices/status/+",
        "devices/commands/+/ack",
        "devices/state/+/reported",
    ]
    assert load_settings(IngestSettings, {"IOT_MQTT_SHARE_GROUP": ""}).mqtt_share_group == ""
    assert default_client_id("", "postgresql://h/db") != default_client_id("unshared", "postgresql://h/db")


class Wire:
    """The consumer's connection to the broker, as its receive path sees it: PUBLISH packets go in as
    bytes, and the PUBACKs it writes are recorded."""

    def __init__(self, consumer: Consumer) -> None:
        self.acked: list[int] = []
        self.writes = 0
        self._written = asyncio.Event()
        self._handler: Any = consumer.client._package_handler
        self._handler._connection = self

    def send_package(self, package: bytes) -> None:
        self.writes += 1
        for at in range(0, len(package), 4):
            assert package[at : at + 2] == b"\x40\x02"  # PUBACK, remaining length 2
            self.acked.append(int.from_bytes(package[at + 2 : at + 4], "big"))
        self._written.set()

    def is_closing(self) -> bool:
        return False

    def publish(
        self, mid: int, topic: str, payload: bytes, *, retain: bool = False, dup: bool = False
    ) -> None:
        """A QoS 1 PUBLISH as MQTT 5 puts it on the wire (no properties)."""
        name = topic.encode()
        body = len(name).to_bytes(2, "big") + name + mid.to_bytes(2, "big") + b"\x00" + payload
        self._handler._handle_packet(0x32 | (0x08 if dup else 0) | (0x01 if retain else 0), body)

    async def wait_acked(self, count: int) -> list[int]:
        while len(self.acked) < count:
            self._written.clear()
            await asyncio.wait_for(self._written.wait(), 5)
        return self.acked


def make_consumer(flush: Any, quota: DeviceQuota | None = None) -> tuple[Consumer, Batcher[Delivery]]:
    batcher: Batcher[Delivery] = Batcher(flush, max_size=10, max_delay=0.0)
    consumer = Consumer(
        mqtt_url="mqtt://127.0.0.1:1",
        client_id="test-poison-consumer",
        share_group="g",
        session_expiry_s=0,
        max_in_flight=10,
        batcher=batcher,
        limits=LIMITS,
        quota=quota,
    )
    return consumer, batcher


async def test_a_failure_storing_a_message_becomes_a_dead_letter_and_the_message_is_acknowledged() -> None:
    flushed: list[list[Delivery]] = []

    async def flush(batch: list[Delivery]) -> None:
        if any(d.readings for d in batch):
            raise RuntimeError("the writer broke on this batch")
        flushed.append(batch)

    consumer, batcher = make_consumer(flush)
    batcher.start()
    try:
        wire = Wire(consumer)
        wire.publish(7, "devices/telemetry/dev-1", b'{"t": 1}')
        assert await wire.wait_acked(1) == [7]
        [[letter]] = flushed
        assert reasons_of(letter) == ["handler_error"]
        assert "the writer broke" in letter.rejects[0].detail
        assert consumer.stuck(0.0) == 0
    finally:
        await batcher.close()


async def test_a_retained_flag_from_the_broker_makes_a_retained_dead_letter() -> None:
    flushed: list[Delivery] = []

    async def flush(batch: list[Delivery]) -> None:
        flushed.extend(batch)

    consumer, batcher = make_consumer(flush)
    batcher.start()
    try:
        wire = Wire(consumer)
        wire.publish(1, "devices/telemetry/dev-1", b'{"t": 1}', retain=True)
        wire.publish(2, "devices/telemetry/dev-1", b'{"t": 2}', dup=True)
        assert sorted(await wire.wait_acked(2)) == [1, 2]
        assert [reasons_of(d) for d in flushed] == [["retained"], []]
        assert len(flushed[1].readings) == 1
        assert [d.redelivered for d in flushed] == [False, True]
    finally:
        await batcher.close()


async def test_messages_waiting_longer_than_the_bound_are_reported_stuck() -> None:
    release = asyncio.Event()
    flushing = asyncio.Event()

    async def flush(batch: list[Delivery]) -> None:
        flushing.set()
        await release.wait()

    consumer, batcher = make_consumer(flush)
    batcher.start()
    wire = Wire(consumer)
    wire.publish(1, "devices/telemetry/d", b'{"t": 1}')
    await flushing.wait()
    assert consumer.stuck(0.0) == 1
    assert consumer.stuck(3600.0) == 0
    assert consumer.oldest_in_flight_s() >= 0.0
    assert wire.acked == []
    release.set()
    assert await wire.wait_acked(1) == [1]
    assert consumer.stuck(0.0) == 0
    assert consumer.oldest_in_flight_s() == 0.0
    await batcher.close()


async def test_a_message_over_quota_is_acknowledged_at_once_and_dead_lettered_with_the_next_batch() -> None:
    release = asyncio.Event()
    flushing = asyncio.Event()
    flushed: list[Delivery] = []

    async def flush(batch: list[Delivery]) -> None:
        flushing.set()
        await release.wait()
        flushed.extend(batch)

    consumer, batcher = make_consumer(flush, DeviceQuota(1, 1, clock=Clock()))
    batcher.start()
    wire = Wire(consumer)
    wire.publish(1, "devices/telemetry/d", b'{"t": 1}')
    await flushing.wait()
    # The bucket is empty now: the next message is refused and acknowledged without waiting for a commit.
    wire.publish(2, "devices/telemetry/d", b'{"t": 2}')
    assert await wire.wait_acked(1) == [2]
    release.set()
    assert await wire.wait_acked(2) == [2, 1]
    await batcher.close()
    assert [reasons_of(d) for d in flushed] == [[], ["rate_limited"]]


async def test_the_pubacks_of_a_batch_leave_in_one_write_and_only_on_the_connection_they_came_on() -> None:
    release = asyncio.Event()
    batches: list[int] = []

    async def flush(batch: list[Delivery]) -> None:
        await release.wait()
        batches.append(len(batch))

    consumer, batcher = make_consumer(flush)
    batcher.start()
    wire = Wire(consumer)
    for mid in range(1, 6):
        wire.publish(mid, "devices/telemetry/d", b'{"t": %d}' % mid)
    release.set()
    assert await wire.wait_acked(5) == [1, 2, 3, 4, 5]
    assert batches == [5]
    assert wire.writes == 1
    # A message whose connection is replaced before its batch commits is not acknowledged on the new one:
    # the broker redelivers it there.
    release.clear()
    wire.publish(6, "devices/telemetry/d", b'{"t": 6}')
    newer = Wire(consumer)  # a reconnect: gmqtt points its handler at the new connection
    release.set()
    newer.publish(6, "devices/telemetry/d", b'{"t": 6}', dup=True)
    assert await newer.wait_acked(1) == [6]
    await consumer.wait_idle()
    assert wire.acked == [1, 2, 3, 4, 5]
    assert consumer.stuck(0.0) == 0
    await batcher.close()


async def test_a_stopping_consumer_takes_no_message_and_acknowledges_none() -> None:
    flushed: list[Delivery] = []

    async def flush(batch: list[Delivery]) -> None:
        flushed.extend(batch)

    consumer, batcher = make_consumer(flush)
    batcher.start()
    wire = Wire(consumer)
    consumer.stop_accepting()
    wire.publish(1, "devices/telemetry/d", b'{"t": 1}')
    await consumer.wait_idle()
    await batcher.close()
    assert flushed == []
    assert wire.acked == []
