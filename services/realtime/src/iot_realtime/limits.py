"""Per-key rate limits of this process (token buckets), with bounded memory.

Used for failed API-key authentications per client address (``IOT_REALTIME_AUTH_FAILURES_PER_MINUTE``) and
for subscribe frames that must ask PostgreSQL about device ids, per credential
(``IOT_REALTIME_DEVICE_CHECKS_PER_MINUTE``). Both guard a cost of this process (its queries to PostgreSQL),
so the count is kept here rather than in Redis: no round trip on the hot path, nothing to fail open when
Redis is down. With N replicas a client gets at most N times the limit, still a fixed bound.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from iot_common.settings import IPNetwork

MAX_TRACKED = 50_000
"""Keys tracked at most (about 200 bytes each); the least recently used is forgotten first."""


class RateLimiter:
    """``per_minute`` events per key and minute, in bursts of up to ``per_minute`` (0: no limit)."""

    def __init__(
        self, per_minute: int, *, max_tracked: int = MAX_TRACKED, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_minute = per_minute
        self._rate = per_minute / 60.0
        self._max_tracked = max_tracked
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        """key -> (tokens, when they were counted); a key with a full bucket needs no entry."""

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return float(self.per_minute)
        tokens, at = entry
        return min(float(self.per_minute), tokens + (now - at) * self._rate)

    def exhausted(self, key: str) -> bool:
        """Whether ``key`` has used up its events (without counting one)."""
        return self.per_minute > 0 and self._tokens(key, self._clock()) < 1.0

    def take(self, key: str) -> bool:
        """Count one event of ``key``; False (and nothing counted) when it is past its limit."""
        if self.per_minute <= 0:
            return True
        now = self._clock()
        tokens = self._tokens(key, now)
        if tokens < 1.0:
            return False
        self._buckets.pop(key, None)
        while len(self._buckets) >= self._max_tracked:
            self._buckets.popitem(last=False)
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def __len__(self) -> int:
        return len(self._buckets)


def client_address(peer: str | None, forwarded_for: str | None, trusted: Sequence[IPNetwork]) -> str | None:
    """The client's address: the peer's, unless the peer is a trusted proxy (``IOT_TRUSTED_PROXIES``);
    then the right-most ``X-Forwarded-For`` entry that is not a trusted proxy itself, as uvicorn does for
    the API. Entries left of it were written by the client and are ignored."""
    if not trusted or not forwarded_for or not _within(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _within(hop, trusted):
            return hop[:64]
    return hops[0][:64] if hops else peer


def _within(address: str | None, networks: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    return any(ip in network for network in networks)


class ExpiringSet:
    """Members remembered for ``ttl_s`` seconds, at most ``max_size`` of them (the oldest go first)."""

    def __init__(
        self, ttl_s: float, *, max_size: int = MAX_TRACKED, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl_s = ttl_s
        self._max_size = max_size
        self._clock = clock
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def add(self, member: str) -> None:
        if self._ttl_s <= 0:
            return
        self._expiry.pop(member, None)
        while len(self._expiry) >= self._max_size:
            self._expiry.popitem(last=False)
        self._expiry[member] = self._clock() + self._ttl_s

    def __contains__(self, member: object) -> bool:
        if not isinstance(member, str):
            return False
        expiry = self._expiry.get(member)
        if expiry is None:
            return False
        if expiry <= self._clock():
            del self._expiry[member]
            return False
        return True

    def __len__(self) -> int:
        return len(self._expiry)
