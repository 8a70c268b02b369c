"""Logins, tokens, API keys and users."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from iot_api.schemas.common import Page
from iot_common.auth import Scope
from iot_common.tenancy import Permission, Role


class Login(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    email: Annotated[str, msgspec.Meta(min_length=1, max_length=320, pattern=r"^[^\x00]*$")]
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=1024, pattern=r"^[^\x00]*$")]


class RefreshRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    refresh_token: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class Tokens(msgspec.Struct, frozen=True):
    """An access token (JWT, ``Authorization: Bearer``) and the refresh token that renews it.

    ``refresh_token`` is null when the session store (Redis) is unavailable: the access token still works.
    """

    access_token: str
    token_type: Literal["bearer"]
    expires_in: int
    refresh_token: str | None
    refresh_expires_in: int | None


class RealtimeToken(msgspec.Struct, frozen=True):
    """A short-lived token for the realtime service's WebSocket (``?token=``)."""

    token: str
    token_type: Literal["realtime"]
    expires_in: int


class Me(msgspec.Struct, frozen=True):
    """The credential sent: who, in which tenant (the one the request acts in), with what permissions."""

    subject: str
    kind: Literal["user", "api_key"]
    scopes: list[Scope]
    tenant_id: str
    role: Role | None
    platform_admin: bool
    permissions: list[Permission]
    tenant_name: str = ""
    """The name of the tenant the request acts in (what a user interface shows)."""


class ApiKeyCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
    scopes: Annotated[list[Scope], msgspec.Meta(min_length=1, max_length=3)]


class ApiKey(msgspec.Struct, frozen=True):
    """A key of the tenant; it grants its ``scopes``, never more than the current role of the user who
    created it (``created_by``; null for a key created without a user, such as a tenant's first key)."""

    id: str
    tenant_id: str
    name: str
    prefix: str
    scopes: list[Scope]
    created_by: str | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKey, frozen=True):
    """The new key; ``key`` is shown this once and never again."""

    key: str


class ApiKeyPage(msgspec.Struct, frozen=True):
    items: list[ApiKey]


Email = Annotated[
    str, msgspec.Meta(min_length=3, max_length=320, pattern=r"^[^\x00-\x20@]+@[^\x00-\x20@]+(?!\n)$")
]
Password = Annotated[str, msgspec.Meta(min_length=8, max_length=1024, pattern=r"^[^\x00]*$")]


class User(msgspec.Struct, frozen=True):
    """A login of the tenant, with its role there."""

    id: str
    tenant_id: str
    email: str
    role: Role
    platform_admin: bool
    disabled: bool
    created_at: datetime


class UserCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A new user of the caller's tenant. E-mails are unique across tenants (a login names no tenant)."""

    email: Email
    password: Password
    role: Role


class UserUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Fields to change. A tenant admin changes ``role``, ``disabled`` and ``password`` of the tenant's
    users; any user changes their own ``password``, giving ``current_password``."""

    role: Role | msgspec.UnsetType = msgspec.UNSET
    disabled: bool | msgspec.UnsetType = msgspec.UNSET
    password: Password | msgspec.UnsetType = msgspec.UNSET
    current_password: Annotated[str, msgspec.Meta(max_length=1024)] | msgspec.UnsetType = msgspec.UNSET


class UserPage(Page, frozen=True):
    items: list[User]
