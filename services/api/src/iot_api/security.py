"""Authentication middleware, scope guard and rate limiting.

Every route needs a credential unless its handler says ``opt={"public": True}`` (login, refresh,
logout: rate limited per client address) or ``opt={"skip_auth": True}`` (health, metrics, OpenAPI).
Each handler names the scope it needs with ``opt={"scope": "read" | "write" | "admin"}``; the controller
sets the default.
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
from iot_common.auth import Principal
from iot_common.net import address_key


def client_address(scope: Scope) -> str:
    """The client as the per-address limits count it: the peer's address, or the one a trusted proxy
    (``IOT_TRUSTED_PROXIES``) forwarded (uvicorn resolves it); an IPv6 client by its /64 network."""
    client = scope.get("client")
    return address_key(str(client[0])) if client else "unknown"


class AuthMiddleware(ASGIMiddleware):
    """Resolve the principal (``request.user``) from ``X-API-Key`` or ``Authorization``; rate limit it."""

    scopes = (ScopeType.HTTP,)
    exclude_opt_key = "skip_auth"

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        auth = services_of(scope["app"].state).auth
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
        await next_app(scope, receive, send)


def scope_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Refuse with 403 when the principal lacks the handler's ``scope`` option."""
    needed = handler.opt.get("scope")
    if needed is None or handler.opt.get("public") or handler.opt.get("skip_auth"):
        return
    principal = connection.scope.get("user")
    if not isinstance(principal, Principal):
        raise Unauthenticated("credentials required")
    if not principal.allows(needed):
        raise Forbidden(f"this operation needs the {needed!r} scope")


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    principal = connection.scope.get("user")
    if not isinstance(principal, Principal):
        raise Unauthenticated("credentials required")
    return principal
