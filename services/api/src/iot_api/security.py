"""Authentication middleware, scope guard and rate limiting.

Every route needs a credential unless its handler says ``opt={"public": True}`` (login, refresh,
logout: rate limited per client address) or ``opt={"skip_auth": True}`` (health, metrics, OpenAPI).
Each handler names the scope it needs with ``opt={"scope": "read" | "write" | "admin"}``; the controller
sets the default.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from litestar.connection import ASGIConnection
from litestar.datastructures import Headers
from litestar.enums import ScopeType
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from iot_api.problems import Forbidden, Unauthorized
from iot_api.services.auth import AuthService
from iot_common.auth import Principal


def client_address(scope: Scope) -> str:
    """The client as the per-address limits count it: the peer's address, or the one a trusted proxy
    (``IOT_TRUSTED_PROXIES``) forwarded; an IPv6 client by its /64 network.

    One IPv6 host (a home, a VM) is given a whole /64 and can pick a new address in it for every request,
    so counting each address would give it an unlimited number of budgets. IPv4 addresses, also when
    written as IPv4-mapped IPv6, count one by one; a peer that is no IP address keeps its name.
    """
    client = scope.get("client")
    if not client:
        return "unknown"
    host = str(client[0])
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


class AuthMiddleware(ASGIMiddleware):
    """Resolve the principal (``request.user``) from ``X-API-Key`` or ``Authorization``; rate limit it."""

    scopes = (ScopeType.HTTP,)
    exclude_opt_key = "skip_auth"

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        auth: AuthService = scope["app"].state.auth
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
        raise Unauthorized("credentials required")
    if not principal.allows(needed):
        raise Forbidden(f"this operation needs the {needed!r} scope")


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    principal = connection.scope.get("user")
    if not isinstance(principal, Principal):
        raise Unauthorized("credentials required")
    return principal
