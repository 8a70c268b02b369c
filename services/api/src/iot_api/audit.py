"""The audit hook: every state-changing request with a credential is recorded by
:class:`~iot_api.services.audit.AuditService` (see that module), in one place for every route."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import msgspec
from litestar import Request
from litestar.enums import ScopeType
from litestar.handlers import HTTPRouteHandler
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from iot_api.state import services_of
from iot_api.tenancy import TenantScope

AUDITED_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
API_PREFIX = "/api/v1/"
DEFERRED = "audit_deferred"
"""Set in the request's state by a handler that records its own event (:func:`defer_audit`)."""


class _Created(msgspec.Struct):
    id: str | int | None = None


_created_decoder = msgspec.json.Decoder(_Created)


def created_id(body: bytes) -> str | None:
    """The ``id`` of a JSON object in a response body, if it has one."""
    try:
        value = _created_decoder.decode(body).id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return None if value is None else str(value)


def target_of(path: str, created: str | None) -> str:
    """What a request acted on, as a path under ``/api/v1``: ``devices/d-1``, ``alerts/<id>/ack``; for a
    creation, with the new resource's id (``devices/d-2``, ``devices/d-1/commands/<id>``)."""
    target = path.removeprefix(API_PREFIX).rstrip("/")
    if created and not target.endswith(created):
        target = f"{target}/{created}"
    return target


class AuditMiddleware(ASGIMiddleware):
    """Record each state-changing request that had a credential, with its final status, before the
    response is sent (see the module's docstring). A handler says ``opt={"audit": False}`` when it changes
    nothing (the realtime token)."""

    scopes = (ScopeType.HTTP,)
    exclude_opt_key = "skip_auth"

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        http = cast("dict[str, Any]", scope)
        handler = http.get("route_handler")
        tenant = http.get("state", {}).get("tenant")
        if (
            http.get("method") not in AUDITED_METHODS
            or not isinstance(tenant, TenantScope)
            or not isinstance(handler, HTTPRouteHandler)
            or handler.opt.get("audit") is False
        ):
            await next_app(scope, receive, send)
            return
        audit = services_of(http["app"].state).audit
        start: Message | None = None
        recorded = False

        async def send_after_record(message: Message) -> None:
            nonlocal start, recorded
            event = cast("dict[str, Any]", message)
            if http.get("state", {}).get(DEFERRED):
                await send(message)  # the handler records the event itself, when its outcome is known
                return
            if event["type"] == "http.response.start":
                start = message  # held until the body is known (a creation's id is in it)
                return
            if event["type"] == "http.response.body" and not recorded and start is not None:
                recorded = True
                status = int(cast("dict[str, Any]", start)["status"])
                created = created_id(event.get("body", b"")) if 200 <= status < 300 else None
                also = None
                if handler.opt.get("platform"):
                    named = http.get("path_params", {}).get("tenant_id", created)
                    also = _uuid(str(named)) if named is not None else None
                operation = handler.operation_id
                await audit.record(
                    tenant,
                    also=also,
                    action=operation if isinstance(operation, str) else handler.handler_name,
                    method=str(http["method"]),
                    path=str(http["path"]),
                    target=target_of(str(http["path"]), created),
                    request_id=str(http.get("state", {}).get("request_id", "")),
                    status=status,
                )
                await send(start)
            await send(message)

        await next_app(scope, receive, send_after_record)


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def audit_recorder(request: Request[Any, Any, Any], tenant: TenantScope) -> Callable[[int], Awaitable[None]]:
    """For a handler whose outcome is known only after its answer started (a streamed import): a function
    that records the request's event with the status the outcome would have had as a plain answer, to be
    awaited once. :func:`defer_audit` then tells the middleware to record nothing itself."""
    handler = request.scope.get("route_handler")
    operation = handler.operation_id if isinstance(handler, HTTPRouteHandler) else None
    action = operation if isinstance(operation, str) else str(getattr(handler, "handler_name", ""))
    path = request.url.path
    request_id = str(request.scope.get("state", {}).get("request_id", ""))
    audit = services_of(request.app.state).audit

    async def record(status: int) -> None:
        await audit.record(
            tenant,
            also=None,
            action=action,
            method=request.method,
            path=path,
            target=target_of(path, None),
            request_id=request_id,
            status=status,
        )

    return record


def defer_audit(request: Request[Any, Any, Any]) -> None:
    """The middleware records nothing for this request: the handler's :func:`audit_recorder` does (call it
    only once the handler cannot answer anything else, so that a refusal is still recorded)."""
    request.scope.setdefault("state", {})[DEFERRED] = True
