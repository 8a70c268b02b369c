"""Health and metrics: no credential, no rate limit."""

from __future__ import annotations

from litestar import Response, get

from iot_api.state import AppServices
from iot_common.health import HealthReport
from iot_common.metrics import render_metrics

_OPEN = {"skip_auth": True}


@get("/healthz", operation_id="healthz", tags=["operations"], opt=_OPEN, security=[{}])
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@get("/readyz", operation_id="readyz", tags=["operations"], opt=_OPEN, security=[{}])
async def readyz(services: AppServices) -> Response[HealthReport]:
    """Readiness: PostgreSQL answers. Redis and MQTT are reported but not required: without Redis the API
    reads the database, without MQTT only sending commands fails (503)."""
    report, ready = await services.health.readiness()
    return Response(report, status_code=200 if ready else 503)


@get("/metrics", operation_id="metrics", tags=["operations"], include_in_schema=False, opt=_OPEN)
async def metrics() -> Response[bytes]:
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)
