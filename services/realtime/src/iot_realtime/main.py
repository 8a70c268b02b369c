"""``iot-realtime``: runs the WebSocket gateway until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import resource

from aiohttp import web

from iot_common.service import run_service
from iot_realtime.app import create_app
from iot_realtime.settings import RealtimeSettings


async def serve(settings: RealtimeSettings, stop: asyncio.Event) -> None:
    """Serve ``create_app(settings)`` until ``stop`` is set, then close every socket."""
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    # A large accept backlog: when a replica stops, its clients all reconnect to the others at once.
    await web.TCPSite(runner, "0.0.0.0", settings.realtime_port, backlog=4096).start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def raise_open_file_limit() -> None:
    """Each WebSocket is a file descriptor: lift the soft limit to the hard one (often 1024 -> much more)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    raise_open_file_limit()
    run_service("iot-realtime", RealtimeSettings, serve)
