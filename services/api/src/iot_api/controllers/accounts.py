"""Logins, refresh sessions, realtime tokens and API keys."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, PathParameter

from iot_api.controllers.deps import AUTH
from iot_api.problems import problem_responses
from iot_api.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPage,
    Login,
    Me,
    RealtimeToken,
    RefreshRequest,
    Tokens,
)
from iot_api.security import client_address, principal_of
from iot_api.services.auth import AuthService

_PUBLIC = {"public": True}


class AuthController(Controller):
    path = "/api/v1"
    tags = ["auth"]
    opt = {"scope": "read"}
    dependencies = {"auth": AUTH}

    @post(
        "/auth/login",
        operation_id="login",
        opt=_PUBLIC,
        status_code=200,
        security=[{}],
        responses=problem_responses(401, 413, 503, public=True),
    )
    async def login(
        self, auth: NamedDependency[AuthService], data: JSONBody[Login], request: Request[Any, Any, Any]
    ) -> Tokens:
        """Trade an e-mail and password for an access token and a refresh token.

        Too many failures this minute for the account (``IOT_API_LOGIN_FAILURES_PER_ACCOUNT``) or the client
        address (``IOT_API_LOGIN_FAILURES_PER_ADDRESS``) give 429 with ``Retry-After``; while the password
        workers are saturated the answer is 503 with ``Retry-After``."""
        return await auth.login(data.email, data.password, client_address(request.scope))

    @post(
        "/auth/refresh",
        operation_id="refresh",
        opt=_PUBLIC,
        status_code=200,
        security=[{}],
        responses=problem_responses(401, 503, public=True),
    )
    async def refresh(self, auth: NamedDependency[AuthService], data: JSONBody[RefreshRequest]) -> Tokens:
        """A new token pair; the refresh token used is spent."""
        return await auth.refresh(data.refresh_token)

    @post(
        "/auth/logout",
        operation_id="logout",
        opt=_PUBLIC,
        status_code=204,
        security=[{}],
        responses=problem_responses(public=True),
    )
    async def logout(self, auth: NamedDependency[AuthService], data: JSONBody[RefreshRequest]) -> None:
        """Revoke the refresh session (the access token lives until it expires, minutes at most)."""
        await auth.logout(data.refresh_token)

    @get("/auth/me", operation_id="whoAmI", responses=problem_responses())
    async def me(self, request: Request[Any, Any, Any]) -> Me:
        """The principal of the credential sent."""
        principal = principal_of(request)
        return Me(subject=principal.subject, kind=principal.kind, scopes=sorted(principal.scopes))  # type: ignore[arg-type]

    @post(
        "/realtime/token",
        operation_id="createRealtimeToken",
        status_code=200,
        responses=problem_responses(),
    )
    async def realtime_token(
        self, auth: NamedDependency[AuthService], request: Request[Any, Any, Any]
    ) -> RealtimeToken:
        """A short-lived token (``IOT_API_REALTIME_TOKEN_TTL_S``) for the realtime WebSocket."""
        return auth.realtime_token(principal_of(request))


class ApiKeyController(Controller):
    path = "/api/v1/api-keys"
    tags = ["auth"]
    opt = {"scope": "admin"}
    dependencies = {"auth": AUTH}

    @post("/", operation_id="createApiKey", responses=problem_responses(413))
    async def create_key(
        self,
        auth: NamedDependency[AuthService],
        data: JSONBody[ApiKeyCreate],
        request: Request[Any, Any, Any],
    ) -> ApiKeyCreated:
        """A new key with the given scopes; ``key`` is in this response only."""
        return await auth.create_key(data, principal_of(request))

    @get("/", operation_id="listApiKeys", responses=problem_responses())
    async def list_keys(self, auth: NamedDependency[AuthService]) -> ApiKeyPage:
        """Every key, revoked ones included, without the secrets."""
        return ApiKeyPage(items=await auth.list_keys())

    @delete("/{key_id:str}", operation_id="revokeApiKey", responses=problem_responses(404))
    async def revoke_key(
        self, auth: NamedDependency[AuthService], key_id: Annotated[str, PathParameter()]
    ) -> None:
        """Revoke a key: it stops working at once."""
        await auth.revoke_key(key_id)
