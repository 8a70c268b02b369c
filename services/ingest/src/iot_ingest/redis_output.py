"""After each commit, Redis: the latest-values hashes (newer values only) and the events on the device
channels (``{prefix}:tenant:{tenant_id}:device:{device_id}``, the tenant owning the device), one pipeline
per batch, batch after batch (best effort: the rows are stored either way)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import msgspec
import redis.asyncio as aioredis
import redis.exceptions
import structlog

from iot_common.commands import publish_command_event
from iot_common.messages import LatestValue, StatusEvent, TelemetryEvent, encode_event
from iot_common.state import STATE_COPY_SCRIPT
from iot_common.topics import RedisNames
from iot_ingest import metrics
from iot_ingest.plan import Plan, latest_values, ts_sort_key

log = structlog.stdlib.get_logger(__name__)

LATEST_SCRIPT: Final = """
local function sort_key(encoded)
  local ok, doc = pcall(cjson.decode, encoded)
  if not ok or type(doc) ~= 'table' or type(doc.ts) ~= 'string' then return '' end
  local base, frac = string.match(doc.ts, '^(%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d)%.?(%d*)')
  if not base then return '' end
  return base .. string.sub(frac .. '000000', 1, 6)
end
local written = 0
for i = 1, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if not current or sort_key(current) <= ARGV[i + 1] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    written = written + 1
  end
end
return written
"""
"""Sets each metric of a device's latest-values hash unless the hash already holds a newer value.

ARGV holds (metric, sort key of its ts, encoded LatestValue) triples; see :func:`plan.ts_sort_key`.
"""

_latest_encoder: Final = msgspec.json.Encoder()


class RedisOutput:
    """The Redis step of committed batches, each started after the previous one has finished, so that the
    events of one device are published in commit order and Redis never delays a commit."""

    def __init__(self, redis_client: aioredis.Redis, names: RedisNames) -> None:
        self._redis = redis_client
        self._names = names
        self._latest_script = redis_client.register_script(LATEST_SCRIPT)
        self._state_script = redis_client.register_script(STATE_COPY_SCRIPT)
        self._tail: asyncio.Task[None] | None = None

    def submit(self, plan: Plan) -> asyncio.Task[None]:
        """Start the Redis step of a committed ``plan`` (after the previous one); the task is that step.

        It never takes longer than the client's socket timeout, and a failure is logged and counted,
        not retried.
        """
        previous = self._tail
        self._tail = task = asyncio.create_task(self._update(plan, previous))
        return task

    async def drain(self) -> None:
        """Wait for the Redis step of every submitted batch."""
        while self._tail is not None and not self._tail.done():
            await asyncio.wait([self._tail])

    async def _update(self, plan: Plan, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            with contextlib.suppress(Exception):
                await previous
        if not plan.readings and not plan.statuses and not plan.command_events and not plan.state_events:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for device_id, values in latest_values(plan.readings).items():
                    args: list[str | bytes] = []
                    for name, (ts, value) in values.items():
                        args += [name, ts_sort_key(ts), _latest_encoder.encode(LatestValue(value, ts))]
                    await self._latest_script(
                        keys=[self._names.latest_key(device_id)], args=args, client=pipe
                    )
                tenants, channel = plan.tenants, self._names.device_channel
                for reading in plan.readings:
                    event = TelemetryEvent(reading.device_id, reading.ts, reading.metrics)
                    pipe.publish(channel(tenants[reading.device_id], reading.device_id), encode_event(event))
                for device_id, (status, at) in plan.statuses.items():
                    pipe.publish(
                        channel(tenants[device_id], device_id),
                        encode_event(StatusEvent(device_id, status, at)),
                    )
                for tenant_id, command in plan.command_events:
                    publish_command_event(pipe, self._names, tenant_id, command)
                for tenant_id, state in plan.state_events:
                    # The copy realtime's `latest` reads and the `state` event, only when newer.
                    await self._state_script(
                        keys=[self._names.state_key(state.device_id)],
                        args=[
                            state.version,
                            encode_event(state.event()),
                            channel(tenant_id, state.device_id),
                        ],
                        client=pipe,
                    )
                await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            metrics.REDIS_FAILURES.inc()
            log.warning(
                "redis update failed; readings are stored, latest values and events of this batch are missed",
                error=f"{type(exc).__name__}: {exc}",
                readings=len(plan.readings),
            )
