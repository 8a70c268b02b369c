"""``iot-ingest``: runs the ingest service until SIGTERM/SIGINT.

Stopping: no new message is taken (those that arrive stay unacknowledged in the broker session), the
queued batch is flushed and acknowledged, the Redis step finishes, then the client disconnects keeping its
session. While PostgreSQL is down the flush is given ``IOT_INGEST_SHUTDOWN_TIMEOUT_S``; what it could not
store is simply not acknowledged and the broker delivers it again.
"""

from __future__ import annotations

import asyncio
import gc
from datetime import timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions as redis_exceptions
import structlog
import uvloop
from aiohttp import web

from iot_common.commands import expire_commands, publish_command_event
from iot_common.db import create_pool
from iot_common.db.partitions import run_maintenance_forever
from iot_common.health import postgres_check, redis_check
from iot_common.service import run_service
from iot_common.topics import RedisNames
from iot_common.web import health_routes
from iot_ingest import metrics
from iot_ingest.actions import ActionRunner
from iot_ingest.alerts import AlertService
from iot_ingest.batcher import Batcher
from iot_ingest.consumer import Consumer, DeviceQuota, default_client_id, ignore_not_acknowledged
from iot_ingest.payload import Limits
from iot_ingest.plan import Delivery
from iot_ingest.settings import IngestSettings
from iot_ingest.store import TRANSIENT_ERRORS, BatchWriter, KnownDevices

log = structlog.stdlib.get_logger("iot_ingest")


def limits_from(settings: IngestSettings) -> Limits:
    return Limits(
        max_payload_bytes=settings.ingest_max_payload_bytes,
        max_readings=settings.ingest_max_readings,
        max_metrics=settings.ingest_max_metrics,
        max_text_length=settings.ingest_max_text_length,
        max_future=timedelta(seconds=settings.ingest_max_future_s),
        retention_days=settings.telemetry_retention_days,
    )


async def serve(settings: IngestSettings, stop: asyncio.Event) -> None:
    """Run the ingest service until ``stop`` is set."""
    asyncio.get_running_loop().set_exception_handler(ignore_not_acknowledged)
    # Thousands of messages wait in a batch, each a task: rarer young-generation collections save CPU.
    gc.set_threshold(50_000, 20, 100)
    pool = await create_pool(
        settings.database_url,
        min_size=settings.database_pool_min,
        max_size=settings.database_pool_max,
        timeout=10,
        command_timeout=60,
    )
    redis = aioredis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
    names = settings.redis_names()
    known = KnownDevices()
    async with pool.acquire() as conn:
        await known.load(conn)
    consumer: Consumer | None = None

    async def publish_command(topic: str, payload: bytes) -> None:
        assert consumer is not None
        await consumer.publish(topic, payload)

    actions = ActionRunner(
        pool,
        redis,
        publish_command,
        names=names,
        workers=settings.ingest_action_workers,
        queue_size=settings.ingest_action_queue,
        webhook_timeout_s=settings.ingest_webhook_timeout_s,
        webhook_attempts=settings.ingest_webhook_attempts,
        webhook_backoff_s=settings.ingest_webhook_backoff_s,
        command_ttl_s=settings.ingest_command_ttl_s,
        command_puback_timeout_s=settings.ingest_command_puback_timeout_s,
    )
    alerts = AlertService(
        pool, redis, settings.redis_url, known, actions, names=names, queue_size=settings.ingest_alert_queue
    )
    await alerts.reload()
    writer = BatchWriter(
        pool, redis, known, names=names, auto_register=settings.ingest_auto_register, on_commit=alerts.submit
    )
    batcher: Batcher[Delivery] = Batcher(
        writer, max_size=settings.ingest_batch_size, max_delay=settings.ingest_batch_delay_ms / 1000
    )
    quota = None
    if settings.ingest_max_readings_per_device_s > 0:
        quota = DeviceQuota(
            settings.ingest_max_readings_per_device_s, settings.ingest_max_readings_per_device_burst
        )
    consumer = Consumer(
        mqtt_url=settings.mqtt_url,
        client_id=settings.mqtt_client_id
        or default_client_id(settings.mqtt_share_group, settings.database_url),
        share_group=settings.mqtt_share_group,
        session_expiry_s=settings.mqtt_session_expiry_s,
        max_in_flight=settings.ingest_max_in_flight,
        batcher=batcher,
        limits=limits_from(settings),
        publish_timeout_s=settings.ingest_command_puback_timeout_s,
        quota=quota,
    )
    metrics.OLDEST_IN_FLIGHT.set_function(consumer.oldest_in_flight_s)

    async def mqtt_check() -> object:
        if not consumer.connected.is_set():
            raise ConnectionError("not connected to the MQTT broker")
        consumer.check_subscriptions()
        return True

    async def stuck_check() -> object:
        stuck = consumer.stuck(settings.ingest_stuck_after_s)
        if stuck:
            raise RuntimeError(
                f"{stuck} messages unacknowledged for more than {settings.ingest_stuck_after_s:g} s"
            )
        return True

    app = web.Application()
    app.add_routes(
        health_routes(
            lambda: {
                "mqtt": mqtt_check,
                "in_flight": stuck_check,
                "postgres": postgres_check(pool),
                "redis": redis_check(redis),
            },
            alive=lambda: not stop.is_set(),
        )
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", settings.ingest_http_port).start()
    background = [
        asyncio.create_task(
            run_maintenance_forever(
                pool,
                retention_days=settings.telemetry_retention_days,
                ahead_days=settings.telemetry_partitions_ahead_days,
            )
        ),
        asyncio.create_task(known.refresh_forever(pool, settings.ingest_device_cache_s)),
        asyncio.create_task(alerts.listen()),
        asyncio.create_task(alerts.refresh_forever(settings.ingest_rules_refresh_s)),
        asyncio.create_task(
            expire_commands_forever(pool, redis, names, settings.ingest_command_expiry_interval_s)
        ),
        asyncio.create_task(actions.run()),
    ]
    alert_worker = asyncio.create_task(alerts.run())
    batcher.start()
    try:
        if await consumer.connect(stop):
            await stop.wait()
    finally:
        consumer.stop_accepting()
        try:
            await asyncio.wait_for(_drain(batcher, writer, consumer), settings.ingest_shutdown_timeout_s)
        except TimeoutError:
            log.error(
                "could not flush before the shutdown timeout; unacknowledged messages stay in the broker"
            )
            batcher.abort()
        try:
            await asyncio.wait_for(alerts.drain(), 2.0)
        except TimeoutError:
            log.warning("alert work still queued at shutdown is left undone")
        alert_worker.cancel()
        await asyncio.gather(alert_worker, return_exceptions=True)
        await consumer.disconnect()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await runner.cleanup()
        await redis.aclose()
        await pool.close()


async def expire_commands_forever(
    pool: asyncpg.Pool[Any], redis: aioredis.Redis, names: RedisNames, interval_s: float
) -> None:
    """Every ``interval_s``: commands past ``expires_at`` become ``expired`` (one replica at a time)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            async with pool.acquire() as conn:
                events = await expire_commands(conn)
        except (*TRANSIENT_ERRORS, asyncpg.PostgresError) as exc:
            log.warning("command expiry failed", error=str(exc))
            continue
        if not events:
            continue
        metrics.COMMANDS_EXPIRED.inc(len(events))
        log.info("commands expired", count=len(events), command_ids=[e.id for e in events][:20])
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for event in events:
                    publish_command_event(pipe, names, event)
                await pipe.execute()
        except (redis_exceptions.RedisError, OSError) as exc:
            log.warning("publishing expired commands failed", error=str(exc))


async def _drain(batcher: Batcher[Delivery], writer: BatchWriter, consumer: Consumer) -> None:
    await batcher.close()
    await consumer.wait_idle()
    await writer.drain()


def main() -> None:
    # uvloop: the per-message work is mostly event-loop work (a task and a PUBACK write per message).
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    run_service("iot-ingest", IngestSettings, serve)
