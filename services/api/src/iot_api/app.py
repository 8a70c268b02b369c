"""Wiring of the API service: ``create_app(settings)`` builds the Litestar application.

Request path: RequestContext (request id, access log) -> CORS -> router -> AuthMiddleware (principal,
rate limit, the tenant it acts in) -> AuditMiddleware (state-changing requests) -> permission guard ->
controller -> service (with the request's TenantScope) -> repository (PostgreSQL) with Redis beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme, Tag
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler, Scope

from iot_api import rollup as rollup_job
from iot_api.audit import AuditMiddleware
from iot_api.cache import Cache, make_redis
from iot_api.context import RequestContext
from iot_api.controllers import CONTROLLERS
from iot_api.edge import DashboardSlash, SecurityHeaders, StaticFileSystem
from iot_api.events import EventPublisher
from iot_api.mqtt import CommandPublisher
from iot_api.problems import EXCEPTION_HANDLERS
from iot_api.repositories.accounts import AccountRepository
from iot_api.repositories.alerts import AlertRepository, AlertRuleRepository
from iot_api.repositories.commands import CommandRepository
from iot_api.repositories.credentials import CredentialRepository
from iot_api.repositories.devices import DeviceRepository
from iot_api.repositories.rejects import RejectRepository
from iot_api.repositories.state import StateRepository
from iot_api.repositories.telemetry import TelemetryRepository
from iot_api.repositories.tenants import AuditRepository, TenantRepository
from iot_api.security import OPENAPI_PATH, AuthMiddleware, permission_guard
from iot_api.services.alerts import AlertRuleService, AlertService
from iot_api.services.audit import AuditService
from iot_api.services.audit import log as audit_log
from iot_api.services.auth import AuthService
from iot_api.services.broker import DynsecProvisioner
from iot_api.services.commands import CommandService
from iot_api.services.devices import DeviceService
from iot_api.services.exports import ExportService
from iot_api.services.identity import IdentityService, parse_service_users
from iot_api.services.imports import ImportService
from iot_api.services.operations import HealthService
from iot_api.services.rejects import RejectService
from iot_api.services.state import StateService
from iot_api.services.telemetry import TelemetryService
from iot_api.services.tenants import TenantService
from iot_api.services.users import UserService
from iot_api.settings import ApiSettings
from iot_api.state import SERVICES, TENANT, Services
from iot_common.db import create_pool
from iot_common.resilience import run_periodic
from iot_common.tenancy import PERMISSIONS, TENANT_HEADER

AUDIT_PURGE_INTERVAL_S = 3600.0


def _openapi() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="IoT platform API",
        version="1.0.0",
        description=(
            "Devices, telemetry history, alerts, commands and credentials, each of one tenant"
            " (a platform admin selects one with the X-Tenant-Id header)."
            " Errors are RFC 9457 problem details."
        ),
        path=OPENAPI_PATH,
        render_plugins=[ScalarRenderPlugin(path="/"), SwaggerRenderPlugin(path="/swagger")],
        components=Components(
            security_schemes={
                "bearer": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT"),
                "apiKey": SecurityScheme(type="apiKey", name="X-API-Key", security_scheme_in="header"),
            }
        ),
        security=[{"bearer": []}, {"apiKey": []}],
        tags=[
            Tag(name="devices"),
            Tag(name="telemetry"),
            Tag(name="ingest"),
            Tag(name="alerts"),
            Tag(name="commands"),
            Tag(name="state", description="Desired and reported state of a device (docs/device-state.md)"),
            Tag(name="auth"),
            Tag(name="tenants"),
            Tag(name="operations"),
            Tag(name="mqtt hooks", description="Called by EMQX, authenticated by X-Hook-Secret"),
        ],
        use_handler_docstrings=True,
        create_examples=False,
    )


def build_services(
    pool: asyncpg.Pool[Any],
    redis: aioredis.Redis,
    mqtt: CommandPublisher,
    broker: DynsecProvisioner | None,
    settings: ApiSettings,
) -> Services:
    names = settings.redis_names()
    cache = Cache(redis, settings.cache_namespace())
    devices = DeviceService(DeviceRepository(pool), cache, settings.api_cache_ttl_s, names)
    events = EventPublisher(cache, names)
    accounts = AccountRepository(pool)
    auth = AuthService(accounts, cache, settings)
    identity = IdentityService(
        CredentialRepository(pool),
        devices,
        broker,
        parse_service_users(settings.mqtt_service_users),
        settings.mqtt_hook_secret,
    )
    telemetry = TelemetryService(
        TelemetryRepository(pool, settings.rollup_retention()),
        devices,
        cache,
        names,
        max_points=settings.api_max_points_per_response,
        heavy_reads_per_principal=settings.api_max_heavy_reads_per_principal,
    )
    return Services(
        devices=devices,
        identity=identity,
        telemetry=telemetry,
        imports=ImportService(
            DeviceRepository(pool),
            identity,
            max_rows=settings.api_import_max_rows,
            max_bytes=settings.api_import_max_bytes,
            max_broker_devices=settings.api_import_max_broker_devices,
        ),
        exports=ExportService(telemetry, max_days=settings.api_export_max_days),
        rejects=RejectService(RejectRepository(pool)),
        alert_rules=AlertRuleService(AlertRuleRepository(pool), events),
        alerts=AlertService(AlertRepository(pool), events),
        commands=CommandService(CommandRepository(pool), devices, mqtt, events, settings.api_command_ttl_s),
        state=StateService(StateRepository(pool), devices, mqtt, cache, names),
        auth=auth,
        users=UserService(accounts, auth),
        tenants=TenantService(TenantRepository(pool), auth),
        audit=AuditService(AuditRepository(pool), settings.audit_retention_days),
        health=HealthService(pool, redis, mqtt),
    )


class _Middleware(AuthMiddleware):
    """Authentication everywhere but the OpenAPI document and its viewers."""

    @staticmethod
    def should_bypass_for_scope(scope: Scope) -> bool:
        return str(scope["path"]).startswith(OPENAPI_PATH)


def dashboard_directory(settings: ApiSettings) -> Path | None:
    """Where the built dashboard is: ``IOT_DASHBOARD_DIR``, else ``dashboard/dist`` of a source checkout."""
    if settings.dashboard_dir:
        return Path(settings.dashboard_dir)
    checkout = Path(__file__).resolve().parents[4] / "dashboard" / "dist"
    return checkout if checkout.is_dir() else None


def _dashboard_routes(settings: ApiSettings) -> list[ControllerRouterHandler]:
    folder = dashboard_directory(settings)
    if folder is None:
        return []
    return [
        create_static_files_router(
            path="/dashboard",
            directories=[folder],
            file_system=StaticFileSystem(),
            html_mode=True,
            opt={"public": True},
            name="dashboard",
        )
    ]


def check_route_permissions(app: Litestar) -> None:
    """Every route is public, skips authentication, or names the permission it needs: refuse to start
    otherwise (a route without one would answer 500 to everyone)."""
    for route in app.routes:
        if route.path.startswith(OPENAPI_PATH):
            continue  # the OpenAPI document and its viewers: public
        for handler in getattr(route, "route_handlers", []):
            if getattr(handler, "http_methods", None) == {"OPTIONS"}:
                continue  # Litestar's own answer to OPTIONS (the authentication lets it through)
            opt = handler.opt
            if not (opt.get("public") or opt.get("skip_auth") or opt.get("permission") in PERMISSIONS):
                raise RuntimeError(f"{route.path} ({handler.handler_name}) declares no permission")


def create_app(settings: ApiSettings) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        pool: asyncpg.Pool[Any] = await create_pool(
            settings.database_url,
            min_size=settings.database_pool_min,
            max_size=settings.database_pool_max,
        )
        redis = make_redis(settings.redis_url)
        mqtt = CommandPublisher(settings.mqtt_url, settings.api_command_puback_timeout_s)
        mqtt.start()
        broker = DynsecProvisioner(settings.mqtt_admin_url) if settings.mqtt_admin_url else None
        services = build_services(pool, redis, mqtt, broker, settings)
        app.state.services = services
        rollup: asyncio.Task[None] | None = None
        audit_retention = asyncio.create_task(
            run_periodic(
                "audit retention", AUDIT_PURGE_INTERVAL_S, services.audit.purge, log=audit_log, run_first=True
            )
        )
        try:
            # A short head start, so that commands sent right after start-up find the broker connected.
            await mqtt.wait_connected(settings.api_command_puback_timeout_s)
            if broker is not None:
                await broker.start()
            await services.auth.bootstrap()
            if settings.api_rollup_interval_s > 0:
                rollup = asyncio.create_task(
                    run_periodic(
                        "telemetry rollup",
                        settings.api_rollup_interval_s,
                        lambda: rollup_job.run_rollup(
                            pool,
                            lag=timedelta(seconds=settings.api_rollup_lag_s),
                            refresh=timedelta(hours=settings.api_rollup_refresh_hours),
                            retention_days=settings.telemetry_retention_days,
                            retention=settings.rollup_retention(),
                        ),
                        log=rollup_job.log,
                        run_first=True,
                    )
                )
            yield
        finally:
            audit_retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await audit_retention
            if rollup is not None:
                rollup.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await rollup
            await mqtt.close()
            if broker is not None:
                await broker.close()
            services.auth.close()
            await redis.aclose()
            await pool.close()

    app = Litestar(
        route_handlers=[*CONTROLLERS, *_dashboard_routes(settings)],
        lifespan=[lifespan],
        state=State({"settings": settings}),
        dependencies={"services": SERVICES, "tenant": TENANT},
        logging_config=None,
        openapi_config=_openapi(),
        cors_config=CORSConfig(
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "X-API-Key",
                "X-Request-ID",
                "If-Match",
                TENANT_HEADER,
            ],
            expose_headers=["X-Request-ID", "Retry-After", "ETag"],
            max_age=600,
        ),
        middleware=[_Middleware(), AuditMiddleware()],
        guards=[permission_guard],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.api_max_body_bytes,
    )
    check_route_permissions(app)
    # Outermost layer, so that 404s, CORS preflights and errors also get a request id and an access line.
    app.asgi_handler = RequestContext(
        SecurityHeaders(
            DashboardSlash(app.asgi_handler),
            docs_path=OPENAPI_PATH,
            connect_src=settings.dashboard_connect_src,
            realtime_url=settings.realtime_url(),
        )
    )
    return app
