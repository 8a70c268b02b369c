"""What ingest and the API's rollup job agree on about late readings (migration 0013).

Ingest marks the minute of every numeric reading older than :data:`LATE_AFTER` when it arrives in
``telemetry_rollup_dirty``, in the batch's transaction; the API's rollup job (``iot_api.rollup``)
recomputes those minutes, their hours and their days. A reading younger than that is never late for the
rollup, because the job rolls an hour up at least ``IOT_API_ROLLUP_LAG_S`` (which may not be less than
:data:`LATE_AFTER`) after it closes.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final

LATE_AFTER: Final = timedelta(seconds=60)
"""A reading this much older than the moment ingest stores it has its minute marked for the rollup job."""
