"""The ingest service's dead letters: what it refused, newest first."""

from __future__ import annotations

from datetime import datetime

from iot_api.pagination import decode_position, paginate
from iot_api.repositories.rejects import RejectRepository
from iot_api.schemas.rejects import RejectPage
from iot_api.services.telemetry import utc


class RejectService:
    def __init__(self, repo: RejectRepository) -> None:
        self.repo = repo

    async def list(
        self,
        *,
        limit: int,
        cursor: str | None,
        device_id: str | None,
        reason: str | None,
        start: datetime | None,
        end: datetime | None,
    ) -> RejectPage:
        after = decode_position(cursor, (datetime, int))
        return await paginate(
            RejectPage,
            lambda n: self.repo.list(
                device_id=device_id, reason=reason, start=utc(start), end=utc(end), after=after, limit=n
            ),
            limit,
            lambda reject: (reject.received_at, reject.id),
        )
