"""The audit log: every state-changing request of a tenant (who, what, on what, when, with what outcome).

:class:`iot_api.audit.AuditMiddleware` records each POST, PUT, PATCH and DELETE that reached a route with a
credential, whatever its answer, before the response leaves (so that a client reading the log afterwards
finds it).
The tenant is the one the request acted in; a platform admin's request on a tenant
(``/api/v1/tenants/{tenant_id}...``, or one that creates a tenant) is also recorded in that tenant. Rows
older than ``IOT_AUDIT_RETENTION_DAYS`` are deleted hourly (:meth:`AuditService.purge`).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import structlog
from prometheus_client import Counter

from iot_api.pagination import paginate
from iot_api.queries import PageRequest, TimeRange
from iot_api.repositories.tenants import AuditRepository
from iot_api.schemas.tenants import AuditPage
from iot_api.tenancy import TenantScope

log = structlog.stdlib.get_logger("iot_api.audit")
AUDIT_FAILURES = Counter("iot_api_audit_failures_total", "Audit events that could not be written")


class AuditService:
    def __init__(self, repo: AuditRepository, retention_days: int) -> None:
        self.repo = repo
        self.retention_days = retention_days

    async def record(
        self,
        tenant: TenantScope,
        *,
        also: uuid.UUID | None,
        action: str,
        method: str,
        path: str,
        target: str,
        request_id: str,
        status: int,
    ) -> None:
        """Write the event in the request's tenant (and in ``also``, a tenant a platform request acted on);
        a failure is logged and counted, never the request's."""
        tenants = [tenant.tenant_id] + ([also] if also is not None and also != tenant.tenant_id else [])
        event = {
            "actor": tenant.actor,
            "actor_kind": tenant.principal.kind,
            "action": action,
            "method": method,
            "path": path,
            "target": target,
            "request_id": request_id,
            "status": status,
        }
        try:
            await self.repo.record(tenants, event)
        except Exception as exc:
            AUDIT_FAILURES.inc()
            log.error("audit event not written", error=f"{type(exc).__name__}: {exc}", **event)

    async def list(self, tenant: TenantScope, page: PageRequest, span: TimeRange) -> AuditPage:
        """The tenant's events, newest first, in ``span``."""
        at = span.in_utc()
        return await paginate(
            AuditPage,
            page,
            (datetime, int),
            lambda after, n: self.repo.list(tenant.tenant_id, at=at, after=after, limit=n),
            lambda event: (event.at, event.id),
        )

    async def purge(self) -> None:
        """Delete the events older than the retention (the periodic job)."""
        deleted = await self.repo.purge(datetime.now(UTC) - timedelta(days=self.retention_days))
        if deleted:
            log.info("audit events past retention deleted", count=deleted)
