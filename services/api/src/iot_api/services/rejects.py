"""The ingest service's dead letters: what it refused, newest first; a tenant sees those of its devices."""

from __future__ import annotations

from datetime import datetime

from iot_api.pagination import paginate
from iot_api.queries import PageRequest, TimeRange
from iot_api.repositories.rejects import RejectRepository
from iot_api.schemas.rejects import RejectPage
from iot_api.tenancy import TenantScope


class RejectService:
    def __init__(self, repo: RejectRepository) -> None:
        self.repo = repo

    async def list(
        self,
        tenant: TenantScope,
        page: PageRequest,
        span: TimeRange,
        *,
        device_id: str | None,
        reason: str | None,
    ) -> RejectPage:
        """The tenant's dead letters newest first, received in ``span``; a platform admin in the default
        tenant also sees those no device could be attributed to."""
        received = span.in_utc()
        return await paginate(
            RejectPage,
            page,
            (datetime, int),
            lambda after, n: self.repo.list(
                tenant.tenant_id,
                unattributed=tenant.sees_unattributed,
                device_id=device_id,
                reason=reason,
                received=received,
                after=after,
                limit=n,
            ),
            lambda reject: (reject.received_at, reject.id),
        )
