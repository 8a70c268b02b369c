"""What every HTTP response carries for browsers: Content-Security-Policy and the other security headers.

Three policies, by path:

- ``/dashboard``: scripts, styles and images from the page's own origin only; the page may connect to its
  own origin (the API), to the realtime endpoint of ``IOT_PUBLIC_REALTIME_URL`` (its origin; for a path,
  ``ws(s)://<host of the request>``) and to the sources in ``IOT_DASHBOARD_CONNECT_SRC``. Without either
  setting, to ``ws(s)://<host of the request>:8001``, the URL the dashboard then derives itself (see
  ``dashboard/src/main.js``).
- ``/api/docs``: the documentation viewers load their scripts and styles from cdn.jsdelivr.net and run an
  inline script, so that page allows exactly that, and nothing else.
- everything else (JSON, problem details, metrics): ``default-src 'none'; frame-ancestors 'none'``.

Every response also gets ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY`` and
``Referrer-Policy: no-referrer``. A header a handler has set itself is kept.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from litestar.enums import ScopeType
from litestar.file_system import BaseLocalFileSystem
from litestar.types import (
    ASGIApp,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Message,
    Receive,
    Scope,
    Send,
)
from litestar.types.file_types import FileInfo

API_CSP = "default-src 'none'; frame-ancestors 'none'"
DOCS_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net;"
    " style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com;"
    " font-src 'self' data: https://cdn.jsdelivr.net https://fonts.gstatic.com;"
    " img-src 'self' data: https://cdn.jsdelivr.net; connect-src 'self';"
    " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_DASHBOARD_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self' {connect}; object-src 'none'; base-uri 'none'; form-action 'self';"
    " frame-ancestors 'none'"
)
DEFAULT_REALTIME_PORT = 8001
# A host name or an IPv4/IPv6 literal: the Host header goes into a header value, so nothing else may pass.
_HOST_RE = re.compile(r"(?P<name>[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?")

_COMMON = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


def dashboard_csp(host: str | None, connect_src: Sequence[str], realtime_url: str | None = None) -> str:
    """The dashboard's policy for a request to ``host`` (the Host header), the page connecting to
    ``realtime_url`` (a validated ``IOT_PUBLIC_REALTIME_URL``: a ws(s) URL or a path on its own host)."""
    sources = list(connect_src)
    match = _HOST_RE.fullmatch(host or "")
    if realtime_url is None:
        if not sources and match is not None:  # the URL the page then guesses: ws(s)://<host>:8001
            name = match.group("name")
            sources = [f"ws://{name}:{DEFAULT_REALTIME_PORT}", f"wss://{name}:{DEFAULT_REALTIME_PORT}"]
    elif realtime_url.startswith("/"):
        # 'self' covers ws(s) to the page's own host in CSP level 3 browsers only: named for the others.
        if match is not None:
            sources += [f"ws://{match.group(0)}", f"wss://{match.group(0)}"]
    else:
        parts = urlsplit(realtime_url)
        sources.append(f"{parts.scheme}://{parts.netloc}")
    unique = list(dict.fromkeys(sources))
    return _DASHBOARD_CSP.format(connect=" ".join(unique)).replace("'self' ;", "'self';")


class SecurityHeaders:
    """ASGI layer adding the headers above to every HTTP response."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        docs_path: str,
        connect_src: Sequence[str] = (),
        realtime_url: str | None = None,
    ) -> None:
        self.app = app
        self.docs_path = docs_path
        self.connect_src = tuple(connect_src)
        self.realtime_url = realtime_url

    def _csp(self, scope: Scope) -> str:
        path = str(scope.get("path", ""))
        if path == "/dashboard" or path.startswith("/dashboard/"):
            host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), None)
            return dashboard_csp(host, self.connect_src, self.realtime_url)
        if path == self.docs_path or path.startswith(self.docs_path + "/"):
            return DOCS_CSP
        return API_CSP

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        csp = self._csp(scope).encode()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in [(b"content-security-policy", csp), *_COMMON]:
                    if name not in present:
                        headers.append((name, value))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class DashboardSlash:
    """``/dashboard`` redirects to ``/dashboard/``: the page loads its assets relatively (``app.js``),
    which from ``/dashboard`` would resolve to ``/app.js``, a 404 that leaves the page without its script."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope.get("path") != "/dashboard":
            await self.app(scope, receive, send)
            return
        query = bytes(scope.get("query_string", b""))
        location = b"/dashboard/" + (b"?" + query if query else b"")
        start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": 308,
            "headers": [(b"location", location), (b"content-length", b"0")],
        }
        body: HTTPResponseBodyEvent = {"type": "http.response.body", "body": b"", "more_body": False}
        await send(start)
        await send(body)


# What the OS answers for a path that cannot name a file: a file taken for a folder, a name or path longer
# than the file system allows, a loop of links, a byte it refuses. For a URL that is simply not there.
_UNRESOLVABLE = frozenset({errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL, errno.EILSEQ})


class StaticFileSystem(BaseLocalFileSystem):
    """The local file system for static files; a path the OS cannot resolve (a NUL byte, a file taken for a
    folder, a name too long, a loop of links) is not there: 404, not 500."""

    async def info(self, path: Any, **kwargs: Any) -> FileInfo:
        if "\x00" in str(path):
            raise FileNotFoundError(str(path))
        try:
            return await super().info(path, **kwargs)
        except OSError as exc:
            if isinstance(exc, NotADirectoryError) or exc.errno in _UNRESOLVABLE:
                raise FileNotFoundError(exc.errno, exc.strerror, str(path)) from None
            raise
