"""Authentication middleware, permission guard and rate limiting.

Every route needs a credential unless its handler says ``opt={"public": True}`` (login, refresh,
logout: rate limited per client address) or ``opt={"skip_auth": True}`` (health, metrics, OpenAPI, the
MQTT hooks). The middleware resolves the principal and the tenant the request acts in
(:class:`~iot_api.tenancy.TenantScope`, ``X-Tenant-Id`` for a platform admin). Each handler names the
permission it needs with ``opt={"permission": "read" | "operate" | "write" | "admin"}`` (the controller
sets the default, see :mod:`iot_common.tenancy`); ``opt={"platform": True}`` marks a route for platform
admins only.
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.datastructures import Headers
from litestar.enums import ScopeType
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from iot_api.errors import Forbidden, Unauthenticated
from iot_api.state import services_of
from iot_api.tenancy import TenantScope, tenant_of
from iot_common.auth import Principal
from iot_common.net import address_key
from iot_common.tenancy import PERMISSIONS

PLATFORM_ONLY = "this operation is for platform admins"
OPENAPI_PATH = "/api/docs"
"""The OpenAPI document and its viewers: no credential needed."""


def client_address(scope: Scope) -> str:
    """The client as the per-address limits count it: the peer's address, or the one a trusted proxy
    (``IOT_TRUSTED_PROXIES``) forwarded (uvicorn resolves it); an IPv6 client by its /64 network."""
    client = scope.get("client")
    return address_key(str(client[0])) if client else "unknown"


class AuthMiddleware(ASGIMiddleware):
    """Resolve the principal (``request.user``) from ``X-API-Key`` or ``Authorization`` and the tenant the
    request acts in (``state["tenant"]``); rate limit the principal."""

    scopes = (ScopeType.HTTP,)
    exclude_opt_key = "skip_auth"

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        services = services_of(scope["app"].state)
        auth = services.auth
        handler = scope.get("route_handler")
        opt: dict[str, Any] = handler.opt if handler is not None else {}
        state = scope.setdefault("state", {})
        if opt.get("public") or scope.get("method") == "OPTIONS":
            await auth.rate_limit(f"ip:{client_address(scope)}")
        else:
            headers = Headers.from_scope(scope)
            principal = await auth.authenticate(
                headers.get("x-api-key"), headers.get("authorization"), client_address(scope)
            )
            scope["user"] = principal
            state["principal"] = principal.subject
            await auth.rate_limit(principal.subject)
            tenant_id = await services.tenants.resolve(principal, headers.get("x-tenant-id"))
            state["tenant"] = TenantScope(tenant_id, principal)
        await next_app(scope, receive, send)


def permission_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Refuse with 403 when the principal lacks the handler's ``permission``, or the route is for platform
    admins (``platform``) and the principal is not one."""
    opt = handler.opt
    if (
        opt.get("public")
        or opt.get("skip_auth")
        or connection.scope.get("method") == "OPTIONS"
        or connection.scope["path"].startswith(OPENAPI_PATH)
    ):
        return
    needed = opt.get("permission")
    if needed not in PERMISSIONS:
        raise RuntimeError(f"route {handler} declares no permission")  # every route must (see tests)
    scope = tenant_of(connection)
    if opt.get("platform") and not scope.principal.platform_admin:
        raise Forbidden(PLATFORM_ONLY)
    if not scope.allows(needed):
        raise Forbidden(f"this operation needs the {needed!r} permission")


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    principal = connection.scope.get("user")
    if not isinstance(principal, Principal):
        raise Unauthenticated("credentials required")
    return principal
