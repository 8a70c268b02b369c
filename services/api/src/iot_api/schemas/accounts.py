"""Logins, tokens and API keys."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from iot_common.auth import Scope


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
    subject: str
    kind: Literal["user", "api_key"]
    scopes: list[Scope]


class ApiKeyCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
    scopes: Annotated[list[Scope], msgspec.Meta(min_length=1, max_length=3)]


class ApiKey(msgspec.Struct, frozen=True):
    id: str
    name: str
    prefix: str
    scopes: list[Scope]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKey, frozen=True):
    """The new key; ``key`` is shown this once and never again."""

    key: str


class ApiKeyPage(msgspec.Struct, frozen=True):
    items: list[ApiKey]
