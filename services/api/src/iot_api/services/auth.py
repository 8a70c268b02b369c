"""Who is calling: passwords, access tokens, refresh sessions in Redis, API keys, rate limits.

- Passwords are hashed with argon2id (argon2-cffi) in a small bounded pool of worker threads
  (:class:`~iot_api.limits.PasswordWorkers`: 503 past it); failed logins are limited per account and per
  client address, failed credentials per client address (:class:`~iot_api.limits.FailureLimiter`: 429).
- A login returns a short-lived JWT and a refresh token; the session behind it lives in Redis under the
  token's SHA-256 and is single-use (a refresh rotates it, a logout deletes it).
- API keys are looked up by prefix, their hash compared in constant time; the row is cached in Redis for
  ``IOT_API_CACHE_TTL_S`` and the entry deleted on revocation (and when its creator's role changes), so a
  revoked key stops at once. A prefix that names no key is remembered too (``UNKNOWN_KEY_TTL_S``), so
  repeating an unknown key costs no query.
- Keys belong to a tenant; a key's scopes never exceed what its creator may do (checked at creation, and at
  each verification against the creator's current role, see :mod:`iot_common.tenancy`).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Literal
from uuid import UUID

import argon2
import msgspec
import structlog
from prometheus_client import Counter

from iot_api.cache import Cache
from iot_api.errors import Forbidden, NotFound, RateLimited, Unauthenticated, Unavailable
from iot_api.limits import FailureLimiter, PasswordWorkers
from iot_api.repositories.accounts import AccountRepository, UserRow
from iot_api.schemas.accounts import ApiKeyCreate, ApiKeyCreated, ApiKeyPage, Me, RealtimeToken, Tokens
from iot_api.settings import ApiSettings
from iot_api.tenancy import TenantScope
from iot_common.auth import (
    InvalidCredential,
    Principal,
    StoredKey,
    api_key_prefix,
    decode_token,
    generate_api_key,
    hash_api_key,
    issue_token,
    user_principal,
    verify_api_key,
)
from iot_common.tenancy import scopes_within

log = structlog.stdlib.get_logger("iot_api.auth")
_hasher = argon2.PasswordHasher()
_DUMMY_HASH = _hasher.hash("not-a-real-password")
KEY_LOOKUPS = Counter("iot_api_key_lookups_total", "API key look-ups in PostgreSQL by result", ["result"])
UNKNOWN_KEY_TTL_S = 300
_UNKNOWN_KEY = b"unknown"


class _Session(msgspec.Struct, frozen=True):
    user_id: str


_session_decoder = msgspec.json.Decoder(_Session)
_key_decoder = msgspec.json.Decoder(StoredKey)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def _verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class RedisKeyCache:
    """API keys remembered in Redis (:class:`~iot_common.auth.KeyCache`): a key's row for
    ``IOT_API_CACHE_TTL_S``, a prefix that named no key for :data:`UNKNOWN_KEY_TTL_S`. Each database
    look-up is counted, and an active key's use recorded."""

    def __init__(self, cache: Cache, accounts: AccountRepository, ttl_s: int) -> None:
        self.cache = cache
        self.accounts = accounts
        self.ttl_s = ttl_s

    def key(self, prefix: str) -> str:
        return self.cache.key("apikey", prefix)

    async def cached(self, prefix: str) -> StoredKey | Literal["unknown"] | None:
        raw = await self.cache.get(self.key(prefix))
        if raw == _UNKNOWN_KEY:
            return "unknown"
        try:
            return None if raw is None else _key_decoder.decode(raw)
        except msgspec.DecodeError:
            return None

    async def looked_up(self, prefix: str, stored: StoredKey | None) -> None:
        KEY_LOOKUPS.labels("unknown" if stored is None else "found").inc()
        if stored is None:
            await self.cache.set(self.key(prefix), _UNKNOWN_KEY, UNKNOWN_KEY_TTL_S)
            return
        await self.cache.set(self.key(prefix), msgspec.json.encode(stored), self.ttl_s)
        if not stored.revoked:
            await self.accounts.touch_key(UUID(stored.id))

    async def forget(self, prefix: str) -> bool:
        """Delete the entry of ``prefix`` (a revoked key, or a remembered "unknown" for a new one)."""
        return await self.cache.delete(self.key(prefix))


class AuthService:
    def __init__(self, accounts: AccountRepository, cache: Cache, settings: ApiSettings) -> None:
        self.accounts = accounts
        self.cache = cache
        self.settings = settings
        self.passwords = PasswordWorkers(settings.api_password_hash_workers, settings.api_password_hash_queue)
        self.failures = FailureLimiter(cache)
        self.keys = RedisKeyCache(cache, accounts, settings.api_cache_ttl_s)

    def close(self) -> None:
        self.passwords.close()

    async def check_password(self, password_hash: str, password: str) -> bool:
        """Whether ``password`` matches ``password_hash`` (in the password workers: 503 when saturated)."""
        return await self.passwords.run(_verify_password, password_hash, password)

    async def login(self, email: str, password: str, client: str) -> Tokens:
        """Tokens for a right e-mail and password; 429 before any work once the account or the client
        address has too many failures this minute, 503 when the password workers are saturated."""
        s = self.settings
        account = hashlib.sha256(email.strip().casefold().encode()).hexdigest()[:32]
        checks = [
            ("login-account", account, s.api_login_failures_per_account),
            ("login-address", client, s.api_login_failures_per_address),
        ]
        await self.failures.check(checks)
        user = await self.accounts.user_by_email(email)
        # Verify against a dummy hash for unknown users, so timing does not tell which e-mails exist.
        ok = await self.passwords.run(_verify_password, user.password_hash if user else _DUMMY_HASH, password)
        if user is None or not ok or user.disabled:
            await self.failures.record(checks)
            raise Unauthenticated("wrong e-mail or password")
        if _hasher.check_needs_rehash(user.password_hash):
            await self.accounts.set_password_hash(user.id, await self.passwords.run(hash_password, password))
        return await self._tokens(user)

    async def _tokens(self, user: UserRow) -> Tokens:
        principal = user_principal(user.id, user.tenant_id, user.role, platform_admin=user.platform_admin)
        access = issue_token(self.settings.jwt_secret, principal, self.settings.api_access_token_ttl_s)
        user_id = str(user.id)
        refresh: str | None = secrets.token_urlsafe(32)
        assert refresh is not None
        ttl = self.settings.api_refresh_ttl_s
        stored = await self.cache.set(
            self.cache.key("session", _token_hash(refresh)), msgspec.json.encode(_Session(user_id)), ttl
        )
        if not stored:
            log.warning("session store unavailable: access token issued without a refresh token")
            refresh = None
        return Tokens(
            access_token=access,
            token_type="bearer",
            expires_in=self.settings.api_access_token_ttl_s,
            refresh_token=refresh,
            refresh_expires_in=ttl if refresh else None,
        )

    async def refresh(self, refresh_token: str) -> Tokens:
        """Trade a refresh token for a new pair; the old refresh token stops working."""
        key = self.cache.key("session", _token_hash(refresh_token))
        raw: bytes | bool | None = await self.cache.call(lambda r: r.getdel(key), False)
        if raw is False:
            raise Unavailable("session store unavailable; log in again later")
        if raw is None or isinstance(raw, bool):
            raise Unauthenticated("refresh token unknown, expired or revoked")
        session = _session_decoder.decode(raw)
        user = await self.accounts.user_by_id(UUID(session.user_id))
        if user is None or user.disabled:
            raise Unauthenticated("user no longer exists or is disabled")
        return await self._tokens(user)

    async def logout(self, refresh_token: str) -> None:
        """Revoke the session of a refresh token (unknown tokens are accepted: the result is the same)."""
        await self.cache.delete(self.cache.key("session", _token_hash(refresh_token)))

    def realtime_token(self, tenant: TenantScope) -> RealtimeToken:
        """A short-lived token for the realtime service, acting in the request's tenant."""
        ttl = self.settings.api_realtime_token_ttl_s
        token = issue_token(
            self.settings.jwt_secret, tenant.principal, ttl, token_type="realtime", tenant_id=tenant.tenant_id
        )
        return RealtimeToken(token=token, token_type="realtime", expires_in=ttl)

    async def authenticate(self, api_key: str | None, authorization: str | None, client: str) -> Principal:
        """The principal of an ``X-API-Key`` or ``Authorization: Bearer`` credential, else 401.

        Each wrong credential counts against the client address; past ``IOT_API_AUTH_FAILURES_PER_MINUTE``
        the answer is 429, and an API key that would need a database look-up is refused before it. A valid
        token, or an API key already in the cache, is still accepted from such an address.
        """
        if not api_key and not authorization:
            raise Unauthenticated("credentials required: `Authorization: Bearer <token>` or `X-API-Key`")
        limit = self.settings.api_auth_failures_per_minute
        try:
            return await self._authenticate(api_key, authorization, client)
        except Unauthenticated:
            counts = await self.failures.record([("auth-address", client, limit)])
            if counts and counts[0] > limit:
                raise self.failures.limited("auth-address") from None
            raise

    async def _authenticate(self, api_key: str | None, authorization: str | None, client: str) -> Principal:
        if api_key:
            return await self._verify_key(api_key, client)
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("Authorization must be `Bearer <token>`")
            try:
                return decode_token(self.settings.jwt_secret, token.strip(), accept=("access",))
            except InvalidCredential as exc:
                raise Unauthenticated(str(exc)) from None
        raise Unauthenticated("credentials required: `Authorization: Bearer <token>` or `X-API-Key`")

    async def _verify_key(self, key: str, client: str) -> Principal:
        async def before_lookup() -> None:
            await self.failures.check([("auth-address", client, self.settings.api_auth_failures_per_minute)])

        try:
            return await verify_api_key(self.accounts.pool, key, cache=self.keys, before_lookup=before_lookup)
        except InvalidCredential as exc:
            raise Unauthenticated(str(exc)) from None

    async def rate_limit(self, subject: str) -> None:
        """Count a request of ``subject`` in this minute's window; 429 past the limit.

        Fails open: while Redis is down requests are not counted.
        """
        limit = self.settings.api_rate_limit_per_minute
        if limit <= 0:
            return
        now = time.time()
        window = int(now // 60)
        key = self.cache.key("rate", subject, window)
        result = await self.cache.pipeline(lambda p: (p.incr(key), p.expire(key, 61)))
        if result is not None and int(result[0]) > limit:
            retry = max(1, 60 - int(now % 60))
            raise RateLimited(f"more than {limit} requests per minute", retry_after_s=retry)

    async def create_key(self, tenant: TenantScope, data: ApiKeyCreate) -> ApiKeyCreated:
        """A new key of the tenant, capped by its creator: scopes granting more than the caller may do are
        refused (403). The key remembers the user behind the caller (the user, or a key's creator)."""
        beyond = scopes_within(data.scopes, tenant.principal.permissions)
        if beyond:
            raise Forbidden(f"a key cannot have more than its creator: {', '.join(beyond)} not allowed")
        return await self.issue_key(tenant.tenant_id, data, tenant.principal.user_id)

    async def issue_key(self, tenant_id: UUID, data: ApiKeyCreate, created_by: UUID | None) -> ApiKeyCreated:
        """Store a new key of ``tenant_id`` (the caller checked who may); ``key`` is shown this once."""
        key, prefix, key_hash = generate_api_key()
        scopes: list[str] = sorted(set(data.scopes))
        row = await self.accounts.create_key(tenant_id, data.name, prefix, key_hash, scopes, created_by)
        if row is None:  # a 48-bit prefix collision: astronomically rare, so one retry is enough
            key, prefix, key_hash = generate_api_key()
            row = await self.accounts.create_key(tenant_id, data.name, prefix, key_hash, scopes, created_by)
        assert row is not None
        await self.keys.forget(prefix)  # a remembered "unknown" for this prefix
        return ApiKeyCreated(**msgspec.structs.asdict(row), key=key)

    async def list_keys(self, tenant: TenantScope) -> ApiKeyPage:
        return ApiKeyPage(items=await self.accounts.list_keys(tenant.tenant_id))

    @staticmethod
    def me(tenant: TenantScope) -> Me:
        """Who the credential sent is, and what it may do in the tenant the request acts in."""
        principal = tenant.principal
        return Me(
            subject=principal.subject,
            kind=principal.kind,
            scopes=sorted(principal.scopes),  # type: ignore[arg-type]
            tenant_id=str(tenant.tenant_id),
            role=principal.role,
            platform_admin=principal.platform_admin,
            permissions=sorted(principal.permissions),
        )

    async def revoke_key(self, tenant: TenantScope, key_id: UUID) -> None:
        row = await self.accounts.revoke_key(tenant.tenant_id, key_id)
        if row is None:
            raise NotFound(f"API key '{key_id}' not found")
        await self.forget_keys([row.prefix])

    async def forget_keys(self, prefixes: list[str]) -> None:
        """Drop the cached verification of these keys (revoked, or their creator changed)."""
        for prefix in prefixes:
            if not await self.keys.forget(prefix):
                log.warning("API key changed but its cache entry could not be deleted", prefix=prefix)

    async def bootstrap(self) -> None:
        """Create the admin user and the API key named by the settings, unless they exist (idempotent)."""
        s = self.settings
        if s.bootstrap_admin_email:
            created = await self.accounts.ensure_platform_admin(
                s.bootstrap_admin_email, await self.passwords.run(hash_password, s.bootstrap_admin_password)
            )
            log.info("bootstrap admin", email=s.bootstrap_admin_email, created=created)
        if s.bootstrap_api_key:
            prefix = api_key_prefix(s.bootstrap_api_key)
            assert prefix is not None
            created = await self.accounts.ensure_bootstrap_key(prefix, hash_api_key(s.bootstrap_api_key))
            await self.keys.forget(prefix)
            log.info("bootstrap API key", prefix=prefix, created=created)
