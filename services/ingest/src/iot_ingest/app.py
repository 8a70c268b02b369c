"""Wiring of the ingest service: ``build(settings)`` makes the parts, ``run(parts, stop)`` runs them.

Stopping: no new message is taken (those that arrive stay unacknowledged in the broker session), the
queued batch is flushed and acknowledged, the Redis step finishes, then the client disconnects keeping its
session. While PostgreSQL is down the flush is given ``IOT_INGEST_SHUTDOWN_TIMEOUT_S``; what it could not
store is simply not acknowledged and the broker delivers it again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

import asyncpg
import redis.asyncio as aioredis
import structlog
from aiohttp import web

from iot_common.db import create_pool
from iot_common.redis_client import create_redis
from iot_common.resilience import run_periodic
from iot_common.startup import log_listening
from iot_ingest import health, metrics, partitions
from iot_ingest.actions import ActionRunner
from iot_ingest.alerts import AlertService
from iot_ingest.batcher import Batcher
from iot_ingest.consumer import Consumer, DeviceQuota, default_client_id
from iot_ingest.device_auth import DeviceAuth, pool_lookup
from iot_ingest.devices import KnownDevices
from iot_ingest.expiry import expire_due_commands
from iot_ingest.http_ingest import HttpIngest
from iot_ingest.membership import Adoptions, Membership, leave_group
from iot_ingest.payload import Limits
from iot_ingest.plan import Delivery
from iot_ingest.presence import Presence, QueueFlush
from iot_ingest.redis_output import RedisOutput
from iot_ingest.settings import IngestSettings
from iot_ingest.state import DesiredRepublisher
from iot_ingest.tenant_quota import TenantQuota, quota_client
from iot_ingest.writer import BatchWriter

log = structlog.stdlib.get_logger("iot_ingest")

IDLE_IN_TRANSACTION_MS: Final = 15_000
"""PostgreSQL ends an ingest session left idle inside a transaction this long. Ingest's transactions run
their statements back to back (the longest wait inside one is a desired-state publication's PUBACK, at
most ``IOT_INGEST_COMMAND_PUBACK_TIMEOUT_S``); a session idle longer belongs to a replica that froze or
whose host was cut off mid-transaction. Ending it releases the rows it locked (``devices``), which
the other replicas' batches, and the peer adopting its MQTT session, wait for (docs/scaling.md)."""


@dataclass
class Parts:
    """Everything the service runs, connected to each other and to the backends."""

    settings: IngestSettings
    pool: asyncpg.Pool[Any]
    writer_pool: asyncpg.Pool[Any]
    """The batch writer's one connection (:func:`create_writer_pool`)."""
    redis: aioredis.Redis
    quota_redis: aioredis.Redis
    known: KnownDevices
    actions: ActionRunner
    alerts: AlertService
    writer: BatchWriter
    presence: Presence
    batcher: Batcher[Delivery]
    consumer: Consumer
    membership: Membership | None
    """None without a share group (a single ingest process)."""
    adoptions: Adoptions | None
    http: HttpIngest


def limits_from(settings: IngestSettings) -> Limits:
    return Limits(
        max_payload_bytes=settings.ingest_max_payload_bytes,
        max_readings=settings.ingest_max_readings,
        max_metrics=settings.ingest_max_metrics,
        max_text_length=settings.ingest_max_text_length,
        max_future=timedelta(seconds=settings.ingest_max_future_s),
        retention_days=settings.telemetry_retention_days,
    )


async def _keep_session(conn: asyncpg.Connection[Any]) -> None:
    """Reset hook of the batch writer's pool: nothing to do. The writer leaves no session state behind
    (no SET, LISTEN, cursor or session advisory lock; asyncpg rolls back an open transaction before this
    hook runs), so the default reset query would cost a round trip per batch for nothing: measured, 120 to
    220 us of latency and 70 to 140 us of ingest's CPU per batch, which at low rates is most of a batch."""


async def create_writer_pool(dsn: str, **options: Any) -> asyncpg.Pool[Any]:
    """The batch writer's pool: batches are written one at a time, so one connection, kept as it is
    between them (:func:`_keep_session`)."""
    return await create_pool(dsn, min_size=1, max_size=1, reset=_keep_session, **options)


async def build(settings: IngestSettings) -> Parts:
    """Open the PostgreSQL pools and the Redis client, load the device cache and the alert rules, and make
    the parts; nothing runs yet."""
    options: dict[str, Any] = {
        "timeout": 10,
        "command_timeout": 60,
        "server_settings": {"idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_MS)},
    }
    pool = await create_pool(
        settings.database_url,
        min_size=settings.database_pool_min,
        max_size=settings.database_pool_max,
        **options,
    )
    writer_pool = await create_writer_pool(settings.database_url, **options)
    redis = create_redis(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
    names = settings.redis_names()
    known = KnownDevices(settings.ingest_auto_register_tenant if settings.ingest_auto_register else None)
    await known.refresh(pool)
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
    quota_redis = quota_client(settings.redis_url)

    async def publish_retained(topic: str, payload: bytes) -> None:
        assert consumer is not None
        await consumer.publish(topic, payload, retain=True)

    # The "device came online" hooks, in order: publish the device's queued commands, then its desired
    # state once more (docs/device-state.md).
    republisher = DesiredRepublisher(pool, publish_retained)
    presence = Presence([QueueFlush(pool, redis, names, publish_command), republisher.republish_desired])
    writer = BatchWriter(
        writer_pool,
        known,
        RedisOutput(redis, names),
        auto_register=settings.ingest_auto_register,
        quota=TenantQuota(quota_redis, names),
        on_commit=alerts.submit,
        on_online=presence.submit,
    )
    batcher: Batcher[Delivery] = Batcher(
        writer, max_size=settings.ingest_batch_size, max_delay=settings.ingest_batch_delay_ms / 1000
    )
    quota = None
    if settings.ingest_max_readings_per_device_s > 0:
        quota = DeviceQuota(
            settings.ingest_max_readings_per_device_s, settings.ingest_max_readings_per_device_burst
        )
    if not settings.mqtt_share_group:
        log.warning(
            "IOT_MQTT_SHARE_GROUP is empty: subscribing without $share (no shared subscriptions); "
            "run a single ingest process, each one would get every message"
        )

    def consumer_for(client_id: str, adopting: bool = False) -> Consumer:
        return Consumer(
            mqtt_url=settings.mqtt_url,
            client_id=client_id,
            share_group=settings.mqtt_share_group,
            session_expiry_s=settings.mqtt_session_expiry_s,
            max_in_flight=settings.ingest_max_in_flight,
            batcher=batcher,
            limits=limits_from(settings),
            publish_timeout_s=settings.ingest_command_puback_timeout_s,
            quota=quota,
            adopting=adopting,
        )

    client_id = settings.mqtt_client_id or default_client_id(settings.mqtt_share_group, settings.database_url)
    consumer = consumer_for(client_id)
    metrics.OLDEST_IN_FLIGHT.set_function(consumer.oldest_in_flight_s)
    # Read when scraped, not counted up and down on every message (a lock each time).
    metrics.IN_FLIGHT.set_function(consumer.in_flight)
    http = HttpIngest(
        auth=DeviceAuth(pool_lookup(pool), ttl_s=settings.ingest_http_auth_cache_s),
        batcher=batcher,
        limits=limits_from(settings),
        quota=quota,
        storage_failing=lambda: writer.failing,
        accepting=lambda: consumer.accepting,
        timeout_s=settings.ingest_http_timeout_s,
        max_concurrent=settings.ingest_http_max_concurrent,
        max_body_bytes=settings.ingest_http_max_body_bytes,
        max_readings=settings.ingest_http_max_readings,
    )
    membership = adoptions = None
    if settings.mqtt_share_group:
        membership = Membership(redis, names, client_id, dead_after_s=settings.ingest_peer_dead_after_s)
        adoptions = Adoptions(membership, lambda peer: consumer_for(peer, adopting=True))
    return Parts(
        settings,
        pool,
        writer_pool,
        redis,
        quota_redis,
        known,
        actions,
        alerts,
        writer,
        presence,
        batcher,
        consumer,
        membership,
        adoptions,
        http,
    )


def background(parts: Parts) -> list[Coroutine[Any, Any, object]]:
    """The tasks beside the message path: periodic jobs, the alert channels, the action workers."""
    settings, pool = parts.settings, parts.pool
    names = settings.redis_names()
    jobs: list[Coroutine[Any, Any, object]] = []
    if parts.adoptions is not None:
        jobs.append(
            run_periodic(
                "share group heartbeat",
                settings.ingest_heartbeat_s,
                parts.adoptions.tick,
                log=log,
                run_first=True,
            )
        )
    return [
        *jobs,
        run_periodic(
            "partition maintenance",
            partitions.INTERVAL_S,
            lambda: partitions.maintain(
                pool,
                retention_days=settings.telemetry_retention_days,
                ahead_days=settings.telemetry_partitions_ahead_days,
            ),
            log=log,
            run_first=True,
        ),
        run_periodic(
            "device cache refresh", settings.ingest_device_cache_s, lambda: parts.known.refresh(pool), log=log
        ),
        parts.alerts.listen(),
        run_periodic("alert rules refresh", settings.ingest_rules_refresh_s, parts.alerts.refresh, log=log),
        run_periodic(
            "command expiry",
            settings.ingest_command_expiry_interval_s,
            lambda: expire_due_commands(pool, parts.redis, names),
            log=log,
        ),
        parts.actions.run(),
    ]


async def run(parts: Parts, stop: asyncio.Event) -> None:
    """Serve the health endpoints, run the background tasks and consume until ``stop`` is set, then stop
    as the module says and close the parts."""
    settings, consumer, batcher = parts.settings, parts.consumer, parts.batcher
    ready = health.checks(consumer, parts.pool, parts.redis, stuck_after_s=settings.ingest_stuck_after_s)
    app = health.create_app(
        ready,
        alive=lambda: not stop.is_set(),
        routes=parts.http.routes(),
        middlewares=[parts.http.problems],
    )
    # Bodies are decompressed by the HTTP ingest itself, within its limit (a gzip bomb stops there).
    runner = web.AppRunner(app, access_log=None, auto_decompress=False)
    await runner.setup()
    await web.TCPSite(runner, settings.bind_host, settings.ingest_http_port).start()
    log_listening(log, settings.bind_host, settings.ingest_http_port)
    tasks = [asyncio.create_task(job) for job in background(parts)]
    alert_worker = asyncio.create_task(parts.alerts.run())
    batcher.start()
    try:
        if await consumer.connect(stop):
            await stop.wait()
    finally:
        end_session = False
        if parts.adoptions is not None and parts.membership is not None:
            await parts.adoptions.close()
            end_session = await leave_group(
                parts.membership, consumer, settings.ingest_shutdown_timeout_s / 2
            )
        consumer.stop_accepting()
        try:
            await asyncio.wait_for(_drain(parts), settings.ingest_shutdown_timeout_s)
        except TimeoutError:
            log.error(
                "could not flush before the shutdown timeout; unacknowledged messages stay in the broker"
            )
            batcher.abort()
        try:
            await asyncio.wait_for(parts.alerts.drain(), 2.0)
        except TimeoutError:
            log.warning("alert work still queued at shutdown is left undone")
        alert_worker.cancel()
        await asyncio.gather(alert_worker, return_exceptions=True)
        await consumer.disconnect(end_session=end_session)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        await parts.redis.aclose()
        await parts.quota_redis.aclose()
        await parts.writer_pool.close()
        await parts.pool.close()


async def _drain(parts: Parts) -> None:
    await parts.batcher.close()
    await parts.consumer.wait_idle()
    await parts.writer.drain()
    await parts.presence.drain()
