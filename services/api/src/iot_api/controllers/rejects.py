"""``/api/v1/ingest/rejects``: the messages the ingest service refused."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter

from iot_api.controllers.params import REJECT_PAGE, TIME_RANGE
from iot_api.problems import problem_responses
from iot_api.queries import PageRequest, TimeRange
from iot_api.schemas.rejects import RejectPage
from iot_api.state import AppServices
from iot_api.tenancy import Tenant

AnyText = Annotated[str | None, QueryParameter(max_length=200, pattern=r"^[^\x00]*$")]


class RejectController(Controller):
    path = "/api/v1/ingest/rejects"
    tags = ["ingest"]
    opt = {"permission": "read"}
    dependencies = {"page": REJECT_PAGE, "span": TIME_RANGE}

    @get("/", operation_id="listIngestRejects", responses=problem_responses())
    async def list_rejects(
        self,
        services: AppServices,
        tenant: Tenant,
        device_id: AnyText = None,
        reason: AnyText = None,
        *,
        span: NamedDependency[TimeRange],
        page: NamedDependency[PageRequest],
    ) -> RejectPage:
        """Messages the ingest service refused, newest first, filtered by device and reason: those of the
        tenant's devices (a platform admin, in the default tenant, also sees those of no known device)."""
        return await services.rejects.list(tenant, page, span, device_id=device_id, reason=reason)
