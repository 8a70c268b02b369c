"""Path and query parameters several controllers share, typed so that a handler receives parsed values.

A path id that does not parse (no UUID, no device id) names nothing: the answer is 404, as for an id
that names no row (see :func:`iot_api.problems.problem_response`).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from litestar.params import PathParameter, QueryParameter

from iot_common.topics import DEVICE_ID_PATTERN

DeviceIdPath = Annotated[str, PathParameter(pattern=DEVICE_ID_PATTERN)]
Limit = Annotated[int, QueryParameter(ge=1, le=500, description="Page size (1-500)")]
Cursor = Annotated[
    str | None, QueryParameter(max_length=512, description="`next_cursor` of the previous page")
]
From = Annotated[
    datetime | None,
    QueryParameter(name="from", description="Start of the range (inclusive), RFC 3339; UTC when no zone"),
]
To = Annotated[datetime | None, QueryParameter(description="End of the range (exclusive), RFC 3339")]
RuleId = Annotated[uuid.UUID, PathParameter(description="Rule id (UUID)")]
AlertId = Annotated[uuid.UUID, PathParameter(description="Alert id (UUID)")]
CommandId = Annotated[uuid.UUID, PathParameter(description="Command id (UUID)")]
ApiKeyId = Annotated[uuid.UUID, PathParameter()]
