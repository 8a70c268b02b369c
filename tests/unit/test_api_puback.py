"""The API's PUBACK tracker: gmqtt's in-flight store that resolves one future per packet id."""

from __future__ import annotations

import asyncio

from iot_api.mqtt import PubackTracker


async def test_puback_resolves_the_waiter_of_its_packet_only() -> None:
    tracker = PubackTracker()
    tracker.push_message(1, b"a")
    first = tracker.waiter(1)
    tracker.push_message(2, b"b")
    second = tracker.waiter(2)
    assert tracker.last_mid == 2
    tracker.remove_message_by_mid(1)  # what gmqtt does on the PUBACK of packet 1
    assert await asyncio.wait_for(first, 1) is True
    assert not second.done()
    assert tracker.get_all() == [(2, b"b")]


async def test_a_cleared_store_fails_every_waiter() -> None:
    tracker = PubackTracker()
    tracker.push_message(7, b"x")
    waiter = tracker.waiter(7)
    tracker.clear()  # a new connection without a session: the message will never be acknowledged
    assert await asyncio.wait_for(waiter, 1) is False
    assert tracker.is_empty


async def test_a_forgotten_waiter_is_not_resolved_later() -> None:
    tracker = PubackTracker()
    tracker.push_message(3, b"x")
    waiter = tracker.waiter(3)
    tracker.forget(3)
    tracker.remove_message_by_mid(3)
    assert not waiter.done()
