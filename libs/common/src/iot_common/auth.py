"""Credentials shared by the API (which issues them) and the realtime service (which checks them).

- Access tokens are JWTs (HS256, ``IOT_JWT_SECRET``) with ``sub``, ``scopes``, ``typ``, ``exp``, the
  ``tenant`` the token acts in and, for a user, its ``role`` (and ``pa`` for a platform admin).
  ``typ`` is ``access`` for API calls and ``realtime`` for the short-lived WebSocket token.
- API keys look like ``iotk_<prefix>_<secret>``. Only the prefix (for lookup) and a SHA-256 of the whole
  key are stored: the key has 192 bits of entropy, so a fast hash is safe, unlike a password.
  :func:`verify_api_key` checks one for both services and returns its tenant and what it may do (its
  scopes, capped by its creator's role); the API passes its Redis cache (:class:`KeyCache`).

What a principal may do is in :mod:`iot_common.tenancy` (roles, scopes, permissions).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import jwt
import msgspec

from iot_common.tenancy import (
    ROLE_PERMISSIONS,
    ROLE_SCOPES,
    Permission,
    Role,
    key_permissions,
    role_permissions,
    scope_permissions,
)

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
    """Who a request or connection acts for, in which tenant, with which permissions.

    ``tenant_id`` is the credential's own tenant (a platform admin may select another per request: the
    API's :class:`~iot_api.tenancy.TenantScope`). ``user_id`` is the user behind the credential: the user
    itself, or the user who created the API key (None for a key without one, such as the bootstrap key).
    """

    subject: str
    kind: Literal["user", "api_key"]
    scopes: frozenset[str]
    tenant_id: uuid.UUID
    role: Role | None = None
    platform_admin: bool = False
    user_id: uuid.UUID | None = None
    permissions: frozenset[Permission] = frozenset()

    def allows(self, permission: str) -> bool:
        """Whether the principal holds ``permission`` (``read``, ``operate``, ``write`` or ``admin``)."""
        return permission in self.permissions


def user_principal(
    user_id: uuid.UUID | str, tenant_id: uuid.UUID, role: Role, *, platform_admin: bool = False
) -> Principal:
    """The principal of a user with ``role`` in ``tenant_id``."""
    uid = uuid.UUID(str(user_id))
    return Principal(
        subject=str(uid),
        kind="user",
        scopes=ROLE_SCOPES[role],
        tenant_id=tenant_id,
        role=role,
        platform_admin=platform_admin,
        user_id=uid,
        permissions=ROLE_PERMISSIONS[role],
    )


class InvalidCredential(Exception):
    """A token or key that is malformed, expired, revoked or unknown; the message says which."""


class UnknownApiKey(InvalidCredential):
    """An API key whose lookup prefix matches no key at all (a wrong secret for a known prefix is not this:
    callers may remember unknown prefixes without letting anyone lock out a real key)."""


def issue_token(
    secret: str,
    principal: Principal,
    ttl_s: int,
    token_type: TokenType = "access",
    *,
    tenant_id: uuid.UUID | None = None,
) -> str:
    """A JWT for ``principal``, acting in ``tenant_id`` (default: its own tenant)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": JWT_ISSUER,
        "sub": principal.subject,
        "scopes": sorted(principal.scopes),
        "typ": token_type,
        "knd": principal.kind,
        "tenant": str(tenant_id or principal.tenant_id),
        "iat": now,
        "exp": now + ttl_s,
        "jti": secrets.token_hex(8),
    }
    if principal.role is not None:
        claims["role"] = principal.role
    if principal.platform_admin:
        claims["pa"] = True
    if principal.kind == "api_key":
        # A key's token carries what the key may do now (its scopes capped by its creator's role).
        claims["perm"] = sorted(principal.permissions)
    if principal.user_id is not None:
        claims["uid"] = str(principal.user_id)
    return jwt.encode(claims, secret, algorithm=JWT_ALGORITHM)


def decode_token(secret: str, token: str, accept: tuple[TokenType, ...] = ("access",)) -> Principal:
    """Verify signature, expiry, type and tenant; raise :class:`InvalidCredential` saying what is wrong."""
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
    try:
        tenant_id = uuid.UUID(str(claims["tenant"]))
        user_id = uuid.UUID(str(claims["uid"])) if "uid" in claims else None
    except (KeyError, ValueError):
        raise InvalidCredential("token without a valid tenant: log in again") from None
    scopes = frozenset(s for s in claims.get("scopes", []) if s in ALL_SCOPES)
    subject = str(claims["sub"])
    if claims.get("knd") == "api_key":
        granted = scope_permissions(scopes) & frozenset(claims.get("perm", []))
        return Principal(
            subject=subject,
            kind="api_key",
            scopes=scopes,
            tenant_id=tenant_id,
            platform_admin=claims.get("pa") is True,
            user_id=user_id,
            permissions=granted,
        )
    role = claims.get("role")
    if role not in ROLE_PERMISSIONS:
        raise InvalidCredential("token without a valid role: log in again")
    return Principal(
        subject=subject,
        kind="user",
        scopes=ROLE_SCOPES[role],
        tenant_id=tenant_id,
        role=role,
        platform_admin=claims.get("pa") is True,
        user_id=user_id,
        permissions=role_permissions(role),
    )


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
    """An API key's row as verification needs it: its hash, never the key (what a cache may keep).

    ``creator_role`` is the current role of the user who created the key (None: no such user, e.g. the
    bootstrap key); ``revoked`` also covers a key whose creator is disabled or deleted.
    """

    id: str
    key_hash: str
    scopes: list[str]
    revoked: bool
    tenant_id: str
    platform_admin: bool
    created_by: str | None
    creator_role: str | None


class KeyCache(Protocol):
    """Where a verifier remembers look-ups, so that a hot key (or a repeated unknown one) costs no query."""

    async def cached(self, prefix: str) -> StoredKey | Literal["unknown"] | None:
        """The key remembered for ``prefix``; ``"unknown"`` for a prefix that named no key; None: ask."""

    async def looked_up(self, prefix: str, stored: StoredKey | None) -> None:
        """Called after each database look-up with what it found (None: no key has this prefix)."""


FIND_API_KEY: Final = """
SELECT k.id::text AS id, k.key_hash, k.scopes, k.tenant_id::text AS tenant_id, k.platform_admin,
       k.created_by::text AS created_by, u.role AS creator_role,
       k.revoked_at IS NOT NULL OR u.disabled_at IS NOT NULL AS revoked
FROM api_keys k LEFT JOIN users u ON u.id = k.created_by
WHERE k.prefix = $1
"""


async def find_api_key(conn: Conn, prefix: str) -> StoredKey | None:
    """The key with this lookup prefix, revoked or not; None when there is none."""
    row = await conn.fetchrow(FIND_API_KEY, prefix)
    if row is None:
        return None
    return StoredKey(
        id=row["id"],
        key_hash=row["key_hash"],
        scopes=list(row["scopes"]),
        revoked=row["revoked"],
        tenant_id=row["tenant_id"],
        platform_admin=row["platform_admin"],
        created_by=row["created_by"],
        creator_role=row["creator_role"],
    )


def key_principal(stored: StoredKey) -> Principal:
    """The principal of a verified key: its tenant, scopes, and what they grant under its creator's role."""
    return _key_principal(
        stored.id,
        tuple(stored.scopes),
        stored.tenant_id,
        stored.platform_admin,
        stored.created_by,
        stored.creator_role,
    )


@functools.lru_cache(maxsize=4096)
def _key_principal(
    key_id: str,
    scopes: tuple[str, ...],
    tenant_id: str,
    platform_admin: bool,
    created_by: str | None,
    creator_role: str | None,
) -> Principal:
    # Memoized: a key verified from the API's cache is not rebuilt on each request (a Principal is immutable,
    # and every input that changes it is part of the memo's key).
    return Principal(
        subject=f"key:{key_id}",
        kind="api_key",
        scopes=frozenset(scopes),
        tenant_id=uuid.UUID(tenant_id),
        platform_admin=platform_admin,
        user_id=uuid.UUID(created_by) if created_by else None,
        permissions=key_permissions(scopes, creator_role, has_creator=created_by is not None),
    )


async def verify_api_key(
    conn: Conn,
    key: str,
    *,
    cache: KeyCache | None = None,
    before_lookup: Callable[[], Awaitable[None]] | None = None,
) -> Principal:
    """The principal of an active API key (its tenant, scopes and permissions); raise
    :class:`InvalidCredential` if unknown or revoked.

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
    return key_principal(stored)
