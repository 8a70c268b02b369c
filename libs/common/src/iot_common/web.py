"""aiohttp routes for ``/healthz``, ``/readyz`` and ``/metrics``, used by the ingest and realtime services."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import msgspec
from aiohttp import web

from iot_common.health import Check, run_checks
from iot_common.metrics import render_metrics


def health_routes(
    checks: Callable[[], Mapping[str, Check]], alive: Callable[[], bool] = lambda: True
) -> list[web.RouteDef]:
    """``/healthz`` answers while the process is alive, ``/readyz`` while every check passes.

    ``checks`` is called per request so that a service can register checks after start-up.
    """

    async def healthz(_: web.Request) -> web.Response:
        ok = alive()
        return web.json_response({"status": "ok" if ok else "stopping"}, status=200 if ok else 503)

    async def readyz(_: web.Request) -> web.Response:
        report = await run_checks(checks())
        ready = report.status == "ok" and alive()
        return web.Response(
            body=msgspec.json.encode(report),
            status=200 if ready else 503,
            content_type="application/json",
        )

    async def metrics(_: web.Request) -> web.Response:
        body, content_type = render_metrics()
        return web.Response(body=body, headers={"Content-Type": content_type})

    return [
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics),
    ]
