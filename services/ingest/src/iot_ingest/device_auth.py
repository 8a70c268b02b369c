"""Device credentials for HTTP ingest: the secret the API issued (``device_credentials``, migration 0005).

A device authenticates with its own MQTT credential, either as HTTP Basic (user name = device id,
password = secret) or as ``Authorization: Bearer <secret>`` (the device is then the one named in the
path). Only the SHA-256 of a secret is stored; the hash of what the client sent is compared to it in
constant time (:func:`hmac.compare_digest`).

Each device's row is cached for ``ttl_s`` seconds (unknown devices too, so random ids do not reach
PostgreSQL on every request): a rotation or a revocation is honoured at most ``ttl_s`` after it was
committed. The cache holds at most ``max_entries`` devices (least recently used evicted).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

FIND_CREDENTIAL: Final = "SELECT secret_hash, revoked_at IS NULL FROM device_credentials WHERE device_id = $1"
MAX_SECRET_CHARS: Final = 512
"""Longer passwords are refused without hashing (issued secrets are 48 characters)."""


@dataclass(frozen=True, slots=True)
class Presented:
    """What the client sent: the device it claims to be (None for a bearer token) and the secret."""

    device_id: str | None
    secret: str


class BadAuthorization(ValueError):
    """The ``Authorization`` header is missing or not a Basic or Bearer credential."""


def parse_authorization(header: str | None) -> Presented:
    """``Basic base64(device_id:secret)`` or ``Bearer secret``; raises :class:`BadAuthorization`."""
    if not header:
        raise BadAuthorization("no Authorization header")
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        if not value or len(value) > MAX_SECRET_CHARS:
            raise BadAuthorization("empty or oversized bearer token")
        return Presented(None, value)
    if scheme.lower() != "basic":
        raise BadAuthorization(f"unsupported scheme {scheme[:20]!r}: use Basic or Bearer")
    if len(value) > 4 * MAX_SECRET_CHARS:
        raise BadAuthorization("oversized Basic credential")
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise BadAuthorization("Basic credential is not base64 of UTF-8 text") from None
    user, colon, secret = decoded.partition(":")
    if not colon or not user or not secret:
        raise BadAuthorization("Basic credential must be device_id:secret")
    return Presented(user, secret)


def hash_secret(secret: str) -> str:
    """The stored form of a secret (as the API's ``hash_secret``)."""
    return hashlib.sha256(secret.encode()).hexdigest()


Lookup = Callable[[str], Awaitable["tuple[str, bool] | None"]]


def pool_lookup(pool: asyncpg.Pool[Any]) -> Lookup:
    """The credential of a device from PostgreSQL: (hash, active), or None when it has none."""

    async def lookup(device_id: str) -> tuple[str, bool] | None:
        row = await pool.fetchrow(FIND_CREDENTIAL, device_id, timeout=5)
        return None if row is None else (str(row[0]), bool(row[1]))

    return lookup


class DeviceAuth:
    """Checks a device's secret against its stored hash, cached for ``ttl_s`` (see the module)."""

    def __init__(
        self,
        lookup: Lookup,
        *,
        ttl_s: float,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        # device id -> (expiry, stored hash or "" for none, active)
        self._cache: OrderedDict[str, tuple[float, str, bool]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    async def _entry(self, device_id: str) -> tuple[str, bool]:
        now = self._clock()
        cached = self._cache.get(device_id)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(device_id)
            return cached[1], cached[2]
        found = await self._lookup(device_id)  # raises while PostgreSQL is unreachable
        stored, active = found if found is not None else ("", False)
        if self.ttl_s > 0:
            self._cache[device_id] = (now + self.ttl_s, stored, active)
            self._cache.move_to_end(device_id)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return stored, active

    async def verify(self, device_id: str, secret: str) -> bool:
        """Whether ``secret`` is the active secret of ``device_id``."""
        stored, active = await self._entry(device_id)
        # Hash and compare even for an unknown device: the answer takes as long either way.
        ok = hmac.compare_digest(stored.encode() or b"-" * 64, hash_secret(secret).encode())
        return ok and active and bool(stored)
