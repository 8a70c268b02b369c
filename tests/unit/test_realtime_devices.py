"""The realtime service's device existence check: found ids are cached for a while, unknown ids never."""

from __future__ import annotations

from typing import Any

from iot_realtime.devices import KnownDevices


class FakePool:
    """Answers ``SELECT id FROM devices WHERE id = ANY($1)`` from a set, and records what was asked."""

    def __init__(self, registered: set[str]) -> None:
        self.registered = registered
        self.asked: list[list[str]] = []

    async def fetch(self, query: str, ids: list[str]) -> list[dict[str, Any]]:
        self.asked.append(list(ids))
        return [{"id": i} for i in ids if i in self.registered]


async def test_found_ids_are_remembered_until_the_ttl_and_unknown_ids_are_asked_again() -> None:
    pool = FakePool({"a", "b"})
    now = [0.0]
    known = KnownDevices(pool, 60.0, clock=lambda: now[0])  # type: ignore[arg-type]
    assert await known.unknown(["a", "ghost"]) == ["ghost"]
    assert await known.unknown(["a", "ghost"]) == ["ghost"]
    assert pool.asked == [["a", "ghost"], ["ghost"]]
    pool.registered.add("ghost")  # registered since: accepted at once
    assert await known.unknown(["ghost"]) == []
    now[0] = 61.0
    pool.registered.discard("a")  # deleted: refused once its cache entry expired
    assert await known.unknown(["a", "ghost"]) == ["a"]


async def test_the_cache_is_bounded_and_forgets_the_oldest_first() -> None:
    pool = FakePool({"a", "b", "c"})
    known = KnownDevices(pool, 60.0, max_cached=2, clock=lambda: 0.0)  # type: ignore[arg-type]
    assert await known.unknown(["a", "b", "c"]) == []
    pool.asked.clear()
    assert await known.unknown(["a", "b", "c"]) == []
    assert pool.asked == [["a"]]  # "a" was evicted when "c" came in
