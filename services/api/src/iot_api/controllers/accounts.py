"""Logins, refresh sessions, realtime tokens, API keys and users of the caller's tenant."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from iot_api.controllers.params import PAGE, ApiKeyId, UserId
from iot_api.problems import problem_responses
from iot_api.queries import PageRequest
from iot_api.schemas.accounts import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPage,
    Login,
    Me,
    RealtimeToken,
    RefreshRequest,
    Tokens,
    User,
    UserCreate,
    UserPage,
    UserUpdate,
)
from iot_api.security import client_address
from iot_api.state import AppServices
from iot_api.tenancy import Tenant

_PUBLIC = {"public": True}
Caller = Request[Any, Any, Any]


class AuthController(Controller):
    path = "/api/v1"
    tags = ["auth"]
    opt = {"permission": "read"}

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
    async def me(self, services: AppServices, tenant: Tenant) -> Me:
        """The principal of the credential sent: its tenant (the one this request acts in), role and
        permissions."""
        me = services.auth.me(tenant)
        row = await services.tenants.repo.get(tenant.tenant_id)
        return msgspec.structs.replace(me, tenant_name=row.name) if row is not None else me

    @post(
        "/realtime/token",
        operation_id="createRealtimeToken",
        status_code=200,
        opt={"audit": False},
        responses=problem_responses(),
    )
    async def realtime_token(self, services: AppServices, tenant: Tenant) -> RealtimeToken:
        """A short-lived token (``IOT_API_REALTIME_TOKEN_TTL_S``) for the realtime WebSocket, in the tenant
        this request acts in."""
        return services.auth.realtime_token(tenant)


class ApiKeyController(Controller):
    path = "/api/v1/api-keys"
    tags = ["auth"]
    opt = {"permission": "admin"}

    @post("/", operation_id="createApiKey", responses=problem_responses(413))
    async def create_key(
        self, services: AppServices, tenant: Tenant, data: JSONBody[ApiKeyCreate]
    ) -> ApiKeyCreated:
        """A new key of the tenant with the given scopes, never more than the caller may do (403);
        ``key`` is in this response only."""
        return await services.auth.create_key(tenant, data)

    @get("/", operation_id="listApiKeys", responses=problem_responses())
    async def list_keys(self, services: AppServices, tenant: Tenant) -> ApiKeyPage:
        """Every key of the tenant, revoked ones included, without the secrets."""
        return await services.auth.list_keys(tenant)

    @delete("/{key_id:str}", operation_id="revokeApiKey", responses=problem_responses(404))
    async def revoke_key(self, services: AppServices, tenant: Tenant, key_id: ApiKeyId) -> None:
        """Revoke a key of the tenant: it stops working at once."""
        await services.auth.revoke_key(tenant, key_id)


class UserController(Controller):
    path = "/api/v1/users"
    tags = ["auth"]
    opt = {"permission": "admin"}
    dependencies = {"page": PAGE}

    @post("/", operation_id="createUser", responses=problem_responses(409, 413, 503))
    async def create_user(self, services: AppServices, tenant: Tenant, data: JSONBody[UserCreate]) -> User:
        """A new user of the tenant with ``role`` (``viewer``, ``operator`` or ``admin``); 409 when the
        e-mail is taken (e-mails are unique across tenants)."""
        return await services.users.create(tenant, data)

    @get("/", operation_id="listUsers", responses=problem_responses())
    async def list_users(
        self, services: AppServices, tenant: Tenant, page: NamedDependency[PageRequest]
    ) -> UserPage:
        """The tenant's users, oldest first."""
        return await services.users.list(tenant, page)

    @patch(
        "/{user_id:str}",
        operation_id="updateUser",
        permission="read",
        responses=problem_responses(404, 413, 503),
    )
    async def update_user(
        self, services: AppServices, tenant: Tenant, user_id: UserId, data: JSONBody[UserUpdate]
    ) -> User:
        """Change a user's ``role``, ``disabled`` or ``password`` (tenant admins). Any user may change their
        own ``password`` with their ``current_password``."""
        return await services.users.update(tenant, user_id, data)

    @delete("/{user_id:str}", operation_id="deleteUser", responses=problem_responses(404))
    async def delete_user(self, services: AppServices, tenant: Tenant, user_id: UserId) -> None:
        """Delete a user of the tenant; the API keys it created are revoked."""
        await services.users.delete(tenant, user_id)
