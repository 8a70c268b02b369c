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

MARK_LATE: Final = """
INSERT INTO telemetry_rollup_dirty AS d (device_id, metric, bucket)
SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])
ON CONFLICT (device_id, metric, bucket) DO UPDATE SET marked_at = now()
"""
"""Marks minutes (``$3``, whole minutes, each (device, metric, minute) once). ``DO UPDATE`` rather than
``DO NOTHING``: the row lock makes the job's delete of a mark wait for the transaction that touched it,
so the job's recomputation always sees the reading (iot_api.rollup)."""
