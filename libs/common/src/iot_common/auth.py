"""Credentials shared by the API (which issues them) and the realtime service (which checks them).

- Access tokens are JWTs (HS256, ``IOT_JWT_SECRET``) with ``sub``, ``scopes``, ``typ`` and ``exp``.
  ``typ`` is ``access`` for API calls and ``realtime`` for the short-lived WebSocket token.
- API keys look like ``iotk_<prefix>_<secret>``. Only the prefix (for lookup) and a SHA-256 of the whole
  key are stored: the key has 192 bits of entropy, so a fast hash is safe, unlike a password.
  :func:`verify_api_key` checks one for both services; the API passes its Redis cache (:class:`KeyCache`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

import jwt
import msgspec

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[Any] | PoolConnectionProxy[Any] | asyncpg.Pool[Any]

Scope = Literal["read", "write", "admin"]
TokenType = Literal["access", "realtime"]
ALL_SCOPES: frozenset[str] = frozenset({"read", "write", "admin"})
API_KEY_PREFIX = "iotk_"
JWT_ALGORITHM = "HS256"
JWT_ISSUER = "iot-platform"


class Principal(msgspec.Struct, frozen=True):
    """Who a request or connection acts for."""

    subject: str
    kind: Literal["user", "api_key"]
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """``admin`` implies ``write``, which implies ``read``."""
        if "admin" in self.scopes:
            return True
        if scope == "read":
            return bool(self.scopes & {"read", "write"})
        return scope in self.scopes


class InvalidCredential(Exception):
    """A token or key that is malformed, expired, revoked or unknown; the message says which."""


class UnknownApiKey(InvalidCredential):
    """An API key whose lookup prefix matches no key at all (a wrong secret for a known prefix is not this:
    callers may remember unknown prefixes without letting anyone lock out a real key)."""


def issue_token(
    secret: str,
    subject: str,
    scopes: frozenset[str] | set[str] | list[str],
    ttl_s: int,
    token_type: TokenType = "access",
    kind: Literal["user", "api_key"] = "user",
) -> str:
    now = int(time.time())
    claims = {
        "iss": JWT_ISSUER,
        "sub": subject,
        "scopes": sorted(scopes),
        "typ": token_type,
        "knd": kind,
        "iat": now,
        "exp": now + ttl_s,
        "jti": secrets.token_hex(8),
    }
    return jwt.encode(claims, secret, algorithm=JWT_ALGORITHM)


def decode_token(secret: str, token: str, accept: tuple[TokenType, ...] = ("access",)) -> Principal:
    """Verify signature, expiry and type; raise :class:`InvalidCredential` saying what is wrong."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[JWT_ALGORITHM],
            issuer=JWT_ISSUER,
            options={"require": ["exp", "sub", "iss"]},
        )
    except jwt.ExpiredSignatureError:
        raise InvalidCredential("token expired") from None
    except jwt.InvalidTokenError as exc:
        raise InvalidCredential(f"invalid token: {exc}") from None
    if claims.get("typ") not in accept:
        raise InvalidCredential(f"token type {claims.get('typ')!r} not accepted here")
    scopes = frozenset(s for s in claims.get("scopes", []) if s in ALL_SCOPES)
    if claims.get("knd") == "api_key":
        return Principal(subject=str(claims["sub"]), kind="api_key", scopes=scopes)
    return Principal(subject=str(claims["sub"]), kind="user", scopes=scopes)


def looks_like_api_key(credential: str) -> bool:
    return credential.startswith(API_KEY_PREFIX)


def generate_api_key() -> tuple[str, str, str]:
    """A new key: (the key to show once, its lookup prefix, its hash to store)."""
    prefix = secrets.token_hex(6)
    key = f"{API_KEY_PREFIX}{prefix}_{secrets.token_urlsafe(24)}"
    return key, prefix, hash_api_key(key)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def api_key_prefix(key: str) -> str | None:
    """The lookup prefix of a well-formed key, else None."""
    if not looks_like_api_key(key):
        return None
    prefix, sep, rest = key[len(API_KEY_PREFIX) :].partition("_")
    if not sep or len(prefix) != 12 or not rest:
        return None
    return prefix


class StoredKey(msgspec.Struct, frozen=True):
    """An API key's row as verification needs it: its hash, never the key (what a cache may keep)."""

    id: str
    key_hash: str
    scopes: list[str]
    revoked: bool


class KeyCache(Protocol):
    """Where a verifier remembers look-ups, so that a hot key (or a repeated unknown one) costs no query."""

    async def cached(self, prefix: str) -> StoredKey | Literal["unknown"] | None:
        """The key remembered for ``prefix``; ``"unknown"`` for a prefix that named no key; None: ask."""

    async def looked_up(self, prefix: str, stored: StoredKey | None) -> None:
        """Called after each database look-up with what it found (None: no key has this prefix)."""


async def find_api_key(conn: Conn, prefix: str) -> StoredKey | None:
    """The key with this lookup prefix, revoked or not; None when there is none."""
    row = await conn.fetchrow(
        "SELECT id::text AS id, key_hash, scopes, revoked_at FROM api_keys WHERE prefix = $1", prefix
    )
    if row is None:
        return None
    return StoredKey(row["id"], row["key_hash"], list(row["scopes"]), row["revoked_at"] is not None)


async def verify_api_key(
    conn: Conn,
    key: str,
    *,
    cache: KeyCache | None = None,
    before_lookup: Callable[[], Awaitable[None]] | None = None,
) -> Principal:
    """The principal of an active API key; raise :class:`InvalidCredential` if unknown or revoked.

    With ``cache``, a key it remembers is checked without a query; ``before_lookup`` runs before each
    database look-up (a rate limit may raise there).
    """
    prefix = api_key_prefix(key)
    if prefix is None:
        raise InvalidCredential("malformed API key")
    stored = await cache.cached(prefix) if cache is not None else None
    if stored is None:
        if before_lookup is not None:
            await before_lookup()
        stored = await find_api_key(conn, prefix)
        if cache is not None:
            await cache.looked_up(prefix, stored)
    if stored is None or stored == "unknown":
        raise UnknownApiKey("unknown API key")
    if not hmac.compare_digest(stored.key_hash, hash_api_key(key)):
        raise InvalidCredential("unknown API key")
    if stored.revoked:
        raise InvalidCredential("API key revoked")
    return Principal(subject=f"key:{stored.id}", kind="api_key", scopes=frozenset(stored.scopes))
