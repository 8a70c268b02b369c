"""Outermost ASGI layer: the request id and the access log, for every request including 404s.

The id comes from ``X-Request-ID`` when it is a sane token (else one is generated), is bound into every log
line of the request and is returned in the response's ``X-Request-ID``. One access-log line per request
carries method, path (never the query string), status, duration and principal; never a credential.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, cast

import structlog
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import Histogram

from iot_common.logging import bind_context, clear_context

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}(?!\n)$")
log = structlog.stdlib.get_logger("iot_api.access")
REQUEST_SECONDS = Histogram(
    "iot_api_request_seconds", "HTTP request duration by method and status", ["method", "status"]
)


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, asgi_scope: Scope, receive: Receive, send: Send) -> None:
        if asgi_scope["type"] != ScopeType.HTTP:
            await self.app(asgi_scope, receive, send)
            return
        scope = cast("dict[str, Any]", asgi_scope)
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                request_id = candidate if _REQUEST_ID_RE.match(candidate) else ""
                break
        request_id = request_id or uuid.uuid4().hex
        clear_context()
        bind_context(request_id=request_id)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(asgi_scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            REQUEST_SECONDS.labels(scope["method"], str(status)).observe(elapsed)
            if scope["path"] not in ("/healthz", "/readyz", "/metrics"):
                log.info(
                    "request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    duration_ms=round(elapsed * 1000, 2),
                    principal=state.get("principal"),
                    client=scope["client"][0] if scope.get("client") else None,
                )
            clear_context()
