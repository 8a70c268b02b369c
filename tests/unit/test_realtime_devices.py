"""The realtime service's device check: a device counts only in its own tenant; found ids are cached for a
while, unknown ids never."""

from __future__ import annotations

from typing import Any

from iot_realtime.devices import KnownDevices

ACME, GLOBEX = "00000000-0000-0000-0000-00000000000a", "00000000-0000-0000-0000-00000000000b"


class FakePool:
    """Answers ``SELECT id FROM devices WHERE tenant_id = $1 AND id = ANY($2)`` from a device -> tenant
    mapping, and records what was asked."""

    def __init__(self, registered: dict[str, str]) -> None:
        self.registered = registered
        self.asked: list[list[str]] = []

    async def fetch(self, query: str, tenant_id: str, ids: list[str]) -> list[dict[str, Any]]:
        self.asked.append(list(ids))
        return [{"id": i} for i in ids if self.registered.get(i) == tenant_id]


async def test_found_ids_are_remembered_until_the_ttl_and_unknown_ids_are_asked_again() -> None:
    pool = FakePool({"a": ACME, "b": ACME})
    now = [0.0]
    known = KnownDevices(pool, 60.0, clock=lambda: now[0])  # type: ignore[arg-type]
    assert await known.unknown(ACME, ["a", "ghost"]) == ["ghost"]
    assert await known.unknown(ACME, ["a", "ghost"]) == ["ghost"]
    assert pool.asked == [["a", "ghost"], ["ghost"]]
    pool.registered["ghost"] = ACME  # registered since: accepted at once
    assert await known.unknown(ACME, ["ghost"]) == []
    now[0] = 61.0
    del pool.registered["a"]  # deleted: refused once its cache entry expired
    assert await known.unknown(ACME, ["a", "ghost"]) == ["a"]


async def test_a_device_of_another_tenant_is_unknown_even_when_cached_for_its_own() -> None:
    pool = FakePool({"a": ACME, "g": GLOBEX})
    known = KnownDevices(pool, 60.0, clock=lambda: 0.0)  # type: ignore[arg-type]
    assert await known.unknown(ACME, ["a"]) == []
    assert await known.unknown(GLOBEX, ["a", "g"]) == ["a"]
    assert known.uncached(GLOBEX, ["a", "g"]) == ["a"]  # remembered for ACME only
    assert await known.unknown(ACME, ["g"]) == ["g"]


async def test_the_cache_is_bounded_and_forgets_the_oldest_first() -> None:
    pool = FakePool({"a": ACME, "b": ACME, "c": ACME})
    known = KnownDevices(pool, 60.0, max_cached=2, clock=lambda: 0.0)  # type: ignore[arg-type]
    assert await known.unknown(ACME, ["a", "b", "c"]) == []
    pool.asked.clear()
    assert await known.unknown(ACME, ["a", "b", "c"]) == []
    assert pool.asked == [["a"]]  # "a" was evicted when "c" came in
