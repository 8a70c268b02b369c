"""Path and query parameters several controllers share, typed so that a handler receives parsed values.

A path id that does not parse (no UUID, no device id) names nothing: the answer is 404, as for an id
that names no row (see :func:`iot_api.problems.problem_response`). A handler takes a list's ``limit`` and
``cursor`` as one ``page`` dependency, and ``from``/``to`` as one ``span``; they stay query parameters.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from litestar.di import Provide
from litestar.params import PathParameter, QueryParameter

from iot_api.queries import PageRequest, TimeRange
from iot_common.topics import DEVICE_ID_PATTERN

DeviceIdPath = Annotated[str, PathParameter(pattern=DEVICE_ID_PATTERN)]
RuleId = Annotated[uuid.UUID, PathParameter(description="Rule id (UUID)")]
AlertId = Annotated[uuid.UUID, PathParameter(description="Alert id (UUID)")]
CommandId = Annotated[uuid.UUID, PathParameter(description="Command id (UUID)")]
ApiKeyId = Annotated[uuid.UUID, PathParameter()]
UserId = Annotated[uuid.UUID, PathParameter(description="User id (UUID)")]
TenantId = Annotated[uuid.UUID, PathParameter(description="Tenant id (UUID)")]

Limit = Annotated[int, QueryParameter(ge=1, le=500, description="Page size (1-500)")]
Cursor = Annotated[
    str | None, QueryParameter(max_length=512, description="`next_cursor` of the previous page")
]
From = Annotated[
    datetime | None,
    QueryParameter(name="from", description="Start of the range (inclusive), RFC 3339; UTC when no zone"),
]
To = Annotated[datetime | None, QueryParameter(description="End of the range (exclusive), RFC 3339")]


def _page(limit: Limit = 50, cursor: Cursor = None) -> PageRequest:
    return PageRequest(limit, cursor)


def _reject_page(
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100, cursor: Cursor = None
) -> PageRequest:
    return PageRequest(limit, cursor)


def _time_range(from_: From = None, to: To = None) -> TimeRange:
    return TimeRange(from_, to)


PAGE = Provide(_page, sync_to_thread=False)
"""``page``: ``limit`` (1-500, default 50) and ``cursor``, the query parameters of a list."""
REJECT_PAGE = Provide(_reject_page, sync_to_thread=False)
"""``page`` of the dead letters: ``limit`` 1-1000, default 100."""
TIME_RANGE = Provide(_time_range, sync_to_thread=False)
"""``span``: the ``from`` and ``to`` query parameters."""
