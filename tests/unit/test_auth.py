from __future__ import annotations

import uuid

import jwt
import pytest

from iot_common.auth import (
    JWT_ALGORITHM,
    InvalidCredential,
    StoredKey,
    api_key_prefix,
    decode_token,
    generate_api_key,
    hash_api_key,
    issue_token,
    key_principal,
    user_principal,
)
from iot_common.tenancy import DEFAULT_TENANT_ID, key_permissions, scopes_within

SECRET = "unit-test-secret-0123456789abcdefghij"
ACME = uuid.UUID("6d1f0c5e-2f7b-4a53-9d8e-111111111111")
USER = uuid.UUID("0b8f5a8e-7d2c-4c1e-8a55-222222222222")


def test_a_token_round_trips_with_its_tenant_and_role() -> None:
    operator = user_principal(USER, ACME, "operator")
    principal = decode_token(SECRET, issue_token(SECRET, operator, ttl_s=60))
    assert principal == operator
    assert principal.tenant_id == ACME
    assert principal.role == "operator"
    assert principal.allows("operate")
    assert not principal.allows("write")
    claims = jwt.decode(
        issue_token(SECRET, operator, ttl_s=60), SECRET, algorithms=[JWT_ALGORITHM], issuer="iot-platform"
    )
    assert (claims["tenant"], claims["role"]) == (str(ACME), "operator")


def test_a_platform_admin_token_may_name_the_tenant_it_acts_in() -> None:
    admin = user_principal(USER, DEFAULT_TENANT_ID, "admin", platform_admin=True)
    principal = decode_token(SECRET, issue_token(SECRET, admin, ttl_s=60, tenant_id=ACME))
    assert principal.platform_admin
    assert principal.tenant_id == ACME


def test_expired_wrong_secret_wrong_type_and_tenantless_tokens_are_refused() -> None:
    viewer = user_principal(USER, ACME, "viewer")
    with pytest.raises(InvalidCredential, match="expired"):
        decode_token(SECRET, issue_token(SECRET, viewer, ttl_s=-10))
    with pytest.raises(InvalidCredential, match="invalid token"):
        decode_token("another-secret-0123456789abcdefghijkl", issue_token(SECRET, viewer, ttl_s=60))
    realtime = issue_token(SECRET, viewer, ttl_s=60, token_type="realtime")
    with pytest.raises(InvalidCredential, match="not accepted"):
        decode_token(SECRET, realtime)
    assert decode_token(SECRET, realtime, accept=("realtime", "access")).subject == str(USER)
    # A token of an earlier release (no tenant, no role) is refused rather than guessed.
    old = jwt.encode(
        {"iss": "iot-platform", "sub": "u", "scopes": ["admin"], "typ": "access", "exp": 2**40},
        SECRET,
        algorithm=JWT_ALGORITHM,
    )
    with pytest.raises(InvalidCredential, match="tenant"):
        decode_token(SECRET, old)


def _stored(scopes: list[str], creator_role: str | None, created_by: str | None = str(USER)) -> StoredKey:
    return StoredKey(
        id=str(uuid.uuid4()),
        key_hash="h",
        scopes=scopes,
        revoked=False,
        tenant_id=str(ACME),
        platform_admin=False,
        created_by=created_by,
        creator_role=creator_role,
    )


def test_a_key_grants_its_scopes_never_more_than_its_creator_role() -> None:
    writer = key_principal(_stored(["write"], "admin"))
    assert writer.tenant_id == ACME
    assert writer.permissions == {"read", "operate", "write"}
    assert not writer.allows("admin")
    # Its creator demoted to viewer: the key reads, nothing more.
    assert key_principal(_stored(["admin"], "viewer")).permissions == {"read"}
    # Its creator gone (no role): nothing.
    assert key_principal(_stored(["admin"], None)).permissions == frozenset()
    # No creating user (the bootstrap key): its scopes alone.
    assert key_principal(_stored(["admin"], None, created_by=None)).allows("admin")
    assert key_permissions(["read"], "admin", has_creator=True) == {"read"}


def test_a_key_token_for_realtime_keeps_the_key_s_tenant_and_cap() -> None:
    capped = key_principal(_stored(["admin"], "operator"))
    principal = decode_token(SECRET, issue_token(SECRET, capped, 60, "realtime"), accept=("realtime",))
    assert principal.kind == "api_key"
    assert principal.tenant_id == ACME
    assert principal.permissions == {"read", "operate"}


def test_scopes_beyond_a_role_are_named() -> None:
    operator = user_principal(USER, ACME, "operator")
    assert scopes_within(["read", "write", "admin"], operator.permissions) == ["admin", "write"]
    assert scopes_within(["read"], operator.permissions) == []


def test_api_keys_are_stored_as_prefix_and_hash() -> None:
    key, prefix, digest = generate_api_key()
    assert api_key_prefix(key) == prefix
    assert digest == hash_api_key(key)
    assert key not in digest
    assert api_key_prefix("iotk_short_x") is None
    assert api_key_prefix("Bearer abc") is None
