"""``iot-api``: runs the REST API under uvicorn until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import structlog
import uvicorn

from iot_api.app import create_app
from iot_api.settings import ApiSettings
from iot_common.service import run_service
from iot_common.startup import MQTT, POSTGRES, REDIS, log_listening

log = structlog.stdlib.get_logger("iot-api")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: :func:`run_service` owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            log_listening(log, self.config.host, self.config.port)


async def serve(settings: ApiSettings, stop: asyncio.Event) -> None:
    """Serve the API until ``stop`` is set; in-flight requests finish before the pool closes."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.bind_host,
        port=settings.api_port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
        # X-Forwarded-For is believed only from the proxies named by IOT_TRUSTED_PROXIES (none by default),
        # never from loopback by default as uvicorn would: the client address is what rate limits count.
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=list(settings.trusted_proxies),
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopped.cancel()
    await task


def main() -> None:
    # Without Redis the API reads the database, without the broker only commands fail: it starts anyway.
    run_service("iot-api", ApiSettings, serve, needs=(POSTGRES,), uses=(REDIS, MQTT))
