"""``iot-realtime``: runs the WebSocket gateway until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio

from aiohttp import web

from iot_common.service import run_service
from iot_realtime.app import create_app
from iot_realtime.settings import RealtimeSettings


async def serve(settings: RealtimeSettings, stop: asyncio.Event) -> None:
    """Serve ``create_app(settings)`` until ``stop`` is set, then close every socket."""
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", settings.realtime_port).start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    run_service("iot-realtime", RealtimeSettings, serve)
