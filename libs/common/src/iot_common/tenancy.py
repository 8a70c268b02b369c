"""Tenants, roles and what each credential may do: the model every service shares (docs/tenancy.md).

A tenant owns devices, alert rules, alerts, commands, API keys, users and the dead letters of its devices.
Migration 0010 moves every earlier row into the tenant ``default`` (:data:`DEFAULT_TENANT_ID`).

What a credential may do is a set of *permissions*:

| permission | allows |
| --- | --- |
| ``read`` | every read of the tenant |
| ``operate`` | commands to devices, alert acknowledgements |
| ``write`` | devices, alert rules (create, change, delete) |
| ``admin`` | users, API keys, webhook actions, the audit log |

A user's role grants :data:`ROLE_PERMISSIONS`; an API key's scopes grant :data:`SCOPE_PERMISSIONS`, never
more than the role of the user who created it (:func:`key_permissions`). A platform admin (the flag on a
user of the ``default`` tenant, or on the bootstrap key) manages tenants and may act in any tenant as its
admin.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Final, Literal, get_args

Role = Literal["viewer", "operator", "admin"]
Permission = Literal["read", "operate", "write", "admin"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
PERMISSIONS: Final[tuple[Permission, ...]] = get_args(Permission)

DEFAULT_TENANT_ID: Final = uuid.UUID("00000000-0000-0000-0000-000000000001")
"""The tenant migration 0010 creates and moves every earlier row into; platform admins live in it."""
DEFAULT_TENANT_NAME: Final = "default"
TENANT_HEADER: Final = "X-Tenant-Id"
"""The header with which a platform admin selects the tenant a request acts in."""
TENANT_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(?!\n)$"
"""A tenant's name (the database checks the same, without the trailing-newline guard)."""

_ALL: Final[frozenset[Permission]] = frozenset(PERMISSIONS)
ROLE_PERMISSIONS: Final[dict[Role, frozenset[Permission]]] = {
    "viewer": frozenset({"read"}),
    "operator": frozenset({"read", "operate"}),
    "admin": _ALL,
}
SCOPE_PERMISSIONS: Final[dict[str, frozenset[Permission]]] = {
    "read": frozenset({"read"}),
    "write": frozenset({"read", "operate", "write"}),
    "admin": _ALL,
}
ROLE_SCOPES: Final[dict[Role, frozenset[str]]] = {
    "viewer": frozenset({"read"}),
    "operator": frozenset({"read"}),
    "admin": frozenset({"admin"}),
}
"""The scopes a user's access token names for its role (what ``scopes`` shows; the role is in the token)."""


def is_role(value: object) -> bool:
    return value in ROLE_PERMISSIONS


def scope_permissions(scopes: Iterable[str]) -> frozenset[Permission]:
    """What a set of API-key scopes grants (unknown scopes grant nothing)."""
    granted: set[Permission] = set()
    for scope in scopes:
        granted |= SCOPE_PERMISSIONS.get(scope, frozenset())
    return frozenset(granted)


def role_permissions(role: str | None) -> frozenset[Permission]:
    """What a role grants (an unknown role grants nothing)."""
    return ROLE_PERMISSIONS.get(role, frozenset()) if role is not None else frozenset()  # type: ignore[call-overload]


def key_permissions(
    scopes: Iterable[str], creator_role: str | None, *, has_creator: bool
) -> frozenset[Permission]:
    """What an API key grants: its scopes, capped by its creator's current role when it has a creator.

    A key without a creating user (the bootstrap key) is capped by nothing but its scopes.
    """
    granted = scope_permissions(scopes)
    return granted & role_permissions(creator_role) if has_creator else granted


def scopes_within(scopes: Iterable[str], permissions: frozenset[Permission]) -> list[str]:
    """The scopes of ``scopes`` that would grant more than ``permissions`` (empty: all within)."""
    return sorted(s for s in set(scopes) if not scope_permissions([s]) <= permissions)
