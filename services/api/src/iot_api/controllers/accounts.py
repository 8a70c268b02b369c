"""Logins, refresh sessions, realtime tokens and API keys."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, delete, get, post
from litestar.params import JSONBody

from iot_api.controllers.params import ApiKeyId
from iot_api.problems import problem_responses
from iot_api.schemas.accounts import (
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
from iot_api.state import AppServices

_PUBLIC = {"public": True}
Caller = Request[Any, Any, Any]


class AuthController(Controller):
    path = "/api/v1"
    tags = ["auth"]
    opt = {"scope": "read"}

    @post(
        "/auth/login",
        operation_id="login",
        opt=_PUBLIC,
        status_code=200,
        security=[{}],
        responses=problem_responses(401, 413, 503, public=True),
    )
    async def login(self, services: AppServices, data: JSONBody[Login], request: Caller) -> Tokens:
        """Trade an e-mail and password for an access token and a refresh token.

        Too many failures this minute for the account (``IOT_API_LOGIN_FAILURES_PER_ACCOUNT``) or the client
        address (``IOT_API_LOGIN_FAILURES_PER_ADDRESS``) give 429 with ``Retry-After``; while the password
        workers are saturated the answer is 503 with ``Retry-After``."""
        return await services.auth.login(data.email, data.password, client_address(request.scope))

    @post(
        "/auth/refresh",
        operation_id="refresh",
        opt=_PUBLIC,
        status_code=200,
        security=[{}],
        responses=problem_responses(401, 503, public=True),
    )
    async def refresh(self, services: AppServices, data: JSONBody[RefreshRequest]) -> Tokens:
        """A new token pair; the refresh token used is spent."""
        return await services.auth.refresh(data.refresh_token)

    @post(
        "/auth/logout",
        operation_id="logout",
        opt=_PUBLIC,
        status_code=204,
        security=[{}],
        responses=problem_responses(public=True),
    )
    async def logout(self, services: AppServices, data: JSONBody[RefreshRequest]) -> None:
        """Revoke the refresh session (the access token lives until it expires, minutes at most)."""
        await services.auth.logout(data.refresh_token)

    @get("/auth/me", operation_id="whoAmI", responses=problem_responses())
    async def me(self, services: AppServices, request: Caller) -> Me:
        """The principal of the credential sent."""
        return services.auth.me(principal_of(request))

    @post(
        "/realtime/token", operation_id="createRealtimeToken", status_code=200, responses=problem_responses()
    )
    async def realtime_token(self, services: AppServices, request: Caller) -> RealtimeToken:
        """A short-lived token (``IOT_API_REALTIME_TOKEN_TTL_S``) for the realtime WebSocket."""
        return services.auth.realtime_token(principal_of(request))


class ApiKeyController(Controller):
    path = "/api/v1/api-keys"
    tags = ["auth"]
    opt = {"scope": "admin"}

    @post("/", operation_id="createApiKey", responses=problem_responses(413))
    async def create_key(
        self, services: AppServices, data: JSONBody[ApiKeyCreate], request: Caller
    ) -> ApiKeyCreated:
        """A new key with the given scopes; ``key`` is in this response only."""
        return await services.auth.create_key(data, principal_of(request))

    @get("/", operation_id="listApiKeys", responses=problem_responses())
    async def list_keys(self, services: AppServices) -> ApiKeyPage:
        """Every key, revoked ones included, without the secrets."""
        return await services.auth.list_keys()

    @delete("/{key_id:str}", operation_id="revokeApiKey", responses=problem_responses(404))
    async def revoke_key(self, services: AppServices, key_id: ApiKeyId) -> None:
        """Revoke a key: it stops working at once."""
        await services.auth.revoke_key(key_id)
