"""Access tokens for tests and benchmarks, as the API issues them to a user of a tenant."""

from __future__ import annotations

import uuid

from iot_common.auth import Principal, TokenType, issue_token
from iot_common.tenancy import DEFAULT_TENANT_ID, ROLE_PERMISSIONS, ROLE_SCOPES, Role, scope_permissions


def user_token(
    secret: str,
    subject: str = "user-test",
    *,
    role: Role = "viewer",
    tenant_id: uuid.UUID = DEFAULT_TENANT_ID,
    ttl_s: int = 300,
    token_type: TokenType = "access",
) -> str:
    """A JWT for a user named ``subject`` with ``role`` in ``tenant_id`` (default: the default tenant)."""
    principal = Principal(
        subject=subject,
        kind="user",
        scopes=ROLE_SCOPES[role],
        tenant_id=tenant_id,
        role=role,
        permissions=ROLE_PERMISSIONS[role],
    )
    return issue_token(secret, principal, ttl_s, token_type)


def key_token(
    secret: str,
    subject: str = "key:test",
    *,
    scopes: frozenset[str] = frozenset(),
    tenant_id: uuid.UUID = DEFAULT_TENANT_ID,
    ttl_s: int = 300,
    token_type: TokenType = "realtime",
) -> str:
    """A JWT as the API issues one for an API key with ``scopes`` (none: a key that may do nothing)."""
    principal = Principal(
        subject=subject,
        kind="api_key",
        scopes=scopes,
        tenant_id=tenant_id,
        permissions=scope_permissions(scopes),
    )
    return issue_token(secret, principal, ttl_s, token_type)
