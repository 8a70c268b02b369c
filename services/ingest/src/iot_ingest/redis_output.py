"""After each commit, Redis: the latest-values hashes (newer values only) and the events on the device
channels (``{prefix}:tenant:{tenant_id}:device:{device_id}``, the tenant owning the device), one pipeline
per batch, batch after batch (best effort: the rows are stored either way).

A batch's latest values go to Redis in one script call for all of its devices, and its events in one
script call that publishes them in order (per :data:`PUBLISH_CHUNK` events): one command and one reply
per batch instead of one per reading, which was most of the Redis step's cost (packing each command and
parsing each reply in Python). Subscribers see exactly the messages a ``PUBLISH`` per event would send.

The scripts go by ``EVAL`` with their text, not as redis-py ``Script`` objects: a pipeline holding a
``Script`` first asks Redis ``SCRIPT EXISTS`` on every execution, a second round trip per batch (and at
low rates a batch is a reading or two). Redis keeps a compiled script by the digest of its text, so
``EVAL`` costs it a SHA-1 of a few hundred bytes, and a Redis that restarted or flushed its scripts needs
nothing loaded again.
"""

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
from iot_common.redis_client import (
    PUBLISH_CONCURRENCY,
    DeviceEventOut,
    as_cluster,
    copy_state,
    publish_device_events,
)
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
local a = 1
for k = 1, #KEYS do
  local last = a + 3 * tonumber(ARGV[a])
  for i = a + 1, last, 3 do
    local current = redis.call('HGET', KEYS[k], ARGV[i])
    if not current or sort_key(current) <= ARGV[i + 1] then
      redis.call('HSET', KEYS[k], ARGV[i], ARGV[i + 2])
      written = written + 1
    end
  end
  a = last + 1
end
return written
"""
"""Sets each metric of each device's latest-values hash unless the hash already holds a newer value.

KEYS are the devices' hashes; ARGV holds, for each key in turn, the number of its metrics and then that
many (metric, sort key of its ts, encoded LatestValue) triples; see :func:`plan.ts_sort_key`.
"""

PUBLISH_SCRIPT: Final = """
for i = 1, #ARGV, 2 do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return #ARGV / 2
"""
"""Publishes (channel, message) pairs in order."""

PUBLISH_CHUNK: Final = 1000
"""Events per publishing script call: bounds the time one call holds Redis."""

_latest_encoder: Final = msgspec.json.Encoder()


class RedisOutput:
    """The Redis step of committed batches, each started after the previous one has finished, so that the
    events of one device are published in commit order and Redis never delays a commit."""

    def __init__(self, redis_client: aioredis.Redis, names: RedisNames) -> None:
        self._redis = redis_client
        self._names = names
        # Cluster only: one call per key, outside a pipeline (EVALSHA, loaded once if missing).
        self._latest_script = redis_client.register_script(LATEST_SCRIPT)
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
            if as_cluster(self._redis) is not None:
                await self._update_cluster(plan)
                return
            async with self._redis.pipeline(transaction=False) as pipe:
                published = plan.published()
                latest = latest_values(published)
                if latest:
                    keys: list[str] = []
                    args: list[str | bytes | int] = []
                    for device_id, values in latest.items():
                        keys.append(self._names.latest_key(device_id))
                        args.append(len(values))
                        for name, (ts, value) in values.items():
                            args += [name, ts_sort_key(ts), _latest_encoder.encode(LatestValue(value, ts))]
                    pipe.eval(LATEST_SCRIPT, len(keys), *keys, *args)
                tenants, channel = plan.tenants, self._names.device_channel
                events: list[str | bytes] = []
                for reading in published:
                    event = TelemetryEvent(reading.device_id, reading.ts, reading.metrics)
                    events += (channel(tenants[reading.device_id], reading.device_id), encode_event(event))
                for device_id, (status, at) in plan.statuses.items():
                    events += (
                        channel(tenants[device_id], device_id),
                        encode_event(StatusEvent(device_id, status, at)),
                    )
                for lo in range(0, len(events), 2 * PUBLISH_CHUNK):
                    pipe.eval(PUBLISH_SCRIPT, 0, *events[lo : lo + 2 * PUBLISH_CHUNK])
                for tenant_id, command in plan.command_events:
                    publish_command_event(pipe, self._names, tenant_id, command)
                for tenant_id, state in plan.state_events:
                    # The copy realtime's `latest` reads and the `state` event, only when newer.
                    pipe.eval(
                        STATE_COPY_SCRIPT,
                        1,
                        self._names.state_key(state.device_id),
                        state.version,
                        encode_event(state.event()),
                        channel(tenant_id, state.device_id),
                    )
                await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            metrics.REDIS_FAILURES.inc()
            log.warning(
                "redis update failed; readings are stored, latest values and events of this batch are missed",
                error=f"{type(exc).__name__}: {exc}",
                readings=len(plan.readings),
            )

    async def _update_cluster(self, plan: Plan) -> None:
        """The same step on a Redis Cluster, whose pipelines take neither scripts nor publications: the
        latest-values script once per device (each hash is one key, so one shard), concurrently, then the
        events by sharded pub/sub (:func:`iot_common.redis_client.spublish_device_events`)."""
        calls = []
        published = plan.published()
        for device_id, values in latest_values(published).items():
            # One key per call: ARGV starts with its metric count, as in a whole batch's call.
            args: list[str | bytes | int] = [len(values)]
            for name, (ts, value) in values.items():
                args += [name, ts_sort_key(ts), _latest_encoder.encode(LatestValue(value, ts))]
            calls.append(self._latest_script(keys=[self._names.latest_key(device_id)], args=args))
        for start in range(0, len(calls), PUBLISH_CONCURRENCY):
            await asyncio.gather(*calls[start : start + PUBLISH_CONCURRENCY])
        tenants = plan.tenants
        events: list[DeviceEventOut] = [
            (tenants[r.device_id], r.device_id, encode_event(TelemetryEvent(r.device_id, r.ts, r.metrics)))
            for r in published
        ]
        events += [
            (tenants[device_id], device_id, encode_event(StatusEvent(device_id, status, at)))
            for device_id, (status, at) in plan.statuses.items()
        ]
        events += [(tenant_id, c.device_id, encode_event(c)) for tenant_id, c in plan.command_events]
        await publish_device_events(self._redis, self._names, events)
        for tenant_id, state in plan.state_events:
            await copy_state(
                self._redis,
                self._names,
                tenant_id,
                state.device_id,
                state.version,
                encode_event(state.event()),
            )
