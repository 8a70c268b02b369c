"""The dashboard's runtime settings, read by the page before it connects (``dashboard/src/main.js``)."""

from __future__ import annotations

import msgspec
from litestar import get
from litestar.datastructures import CacheControlHeader, State

from iot_api.settings import ApiSettings


class DashboardConfig(msgspec.Struct, frozen=True, kw_only=True):
    realtime_url: str | None
    """``IOT_PUBLIC_REALTIME_URL``: a ws(s) URL, or a path the page resolves against its own origin;
    ``null``: the page connects to ``ws(s)://<its host>:8001/ws``."""


@get(
    "/dashboard/config.json",
    operation_id="dashboardConfig",
    include_in_schema=False,
    opt={"public": True},
    cache_control=CacheControlHeader(no_cache=True, no_store=True),
    sync_to_thread=False,
)
def dashboard_config(state: State) -> DashboardConfig:
    """Where the dashboard finds the realtime service; never cached, so a redeployment takes effect."""
    settings: ApiSettings = state.settings
    return DashboardConfig(realtime_url=settings.realtime_url())
