"""``/api/v1/ingest/rejects``: the messages the ingest service refused."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter

from iot_api.controllers.params import Cursor, From, To
from iot_api.problems import problem_responses
from iot_api.schemas.rejects import RejectPage
from iot_api.state import Services

AnyText = Annotated[str | None, QueryParameter(max_length=200, pattern=r"^[^\x00]*$")]


class RejectController(Controller):
    path = "/api/v1/ingest/rejects"
    tags = ["ingest"]
    opt = {"scope": "read"}

    @get("/", operation_id="listIngestRejects", responses=problem_responses())
    async def list_rejects(
        self,
        services: NamedDependency[Services],
        device_id: AnyText = None,
        reason: AnyText = None,
        from_: From = None,
        to: To = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
        cursor: Cursor = None,
    ) -> RejectPage:
        """Messages the ingest service refused, newest first, filtered by device and reason."""
        return await services.rejects.list(
            limit=limit, cursor=cursor, device_id=device_id, reason=reason, start=from_, end=to
        )
