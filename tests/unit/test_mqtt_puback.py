"""The PUBACK tracker shared by the API and ingest: gmqtt's in-flight store that resolves one future per
packet id with the PUBACK's MQTT 5 reason code."""

from __future__ import annotations

import asyncio

import gmqtt

from iot_common.mqtt import PubackTracker, reason_text


async def test_puback_resolves_the_waiter_of_its_packet_only() -> None:
    tracker = PubackTracker()
    tracker.push_message(1, b"a")
    first = tracker.waiter(1)
    tracker.push_message(2, b"b")
    second = tracker.waiter(2)
    assert tracker.last_mid == 2
    tracker.remove_message_by_mid(1)  # what gmqtt does on the PUBACK of packet 1
    assert await asyncio.wait_for(first, 1) == 0
    assert not second.done()
    assert tracker.get_all() == [(2, b"b")]


async def test_a_cleared_store_fails_every_waiter() -> None:
    tracker = PubackTracker()
    tracker.push_message(7, b"x")
    waiter = tracker.waiter(7)
    tracker.clear()  # a new connection without a session: the message will never be acknowledged
    assert await asyncio.wait_for(waiter, 1) is None
    assert tracker.is_empty


async def test_a_forgotten_waiter_is_not_resolved_later() -> None:
    tracker = PubackTracker()
    tracker.push_message(3, b"x")
    waiter = tracker.waiter(3)
    tracker.forget(3)
    tracker.remove_message_by_mid(3)
    assert not waiter.done()


async def test_the_puback_reason_code_reaches_the_waiter() -> None:
    """gmqtt's own PUBACK handler, fed MQTT 5 PUBACK bodies: packet id, then the optional reason code."""
    tracker = PubackTracker()
    client = gmqtt.Client("t-puback-unit", persistent_storage=tracker)
    tracker.attach(client)
    handler = client._package_handler
    for mid, body, expected in [
        (5, b"\x00\x05\x87\x00", 0x87),  # not authorized, empty properties
        (6, b"\x00\x06\x10", 0x10),  # no matching subscribers
        (7, b"\x00\x07", 0),  # success: MQTT 5 lets the broker omit the reason code
    ]:
        tracker.push_message(mid, b"publish")
        waiter = tracker.waiter(mid)
        handler._handle_packet(0x40, body)  # PUBACK
        assert await asyncio.wait_for(waiter, 1) == expected
    assert tracker.is_empty
    assert reason_text(0x87) == "not authorized (135)"
