"""The ingest service's dead letters: what it refused, newest first."""

from __future__ import annotations

from datetime import datetime

from iot_api.pagination import paginate
from iot_api.queries import PageRequest, TimeRange
from iot_api.repositories.rejects import RejectRepository
from iot_api.schemas.rejects import RejectPage


class RejectService:
    def __init__(self, repo: RejectRepository) -> None:
        self.repo = repo

    async def list(
        self, page: PageRequest, span: TimeRange, *, device_id: str | None, reason: str | None
    ) -> RejectPage:
        """Dead letters newest first, received in ``span``."""
        received = span.in_utc()
        return await paginate(
            RejectPage,
            page,
            (datetime, int),
            lambda after, n: self.repo.list(
                device_id=device_id, reason=reason, received=received, after=after, limit=n
            ),
            lambda reject: (reject.received_at, reject.id),
        )
