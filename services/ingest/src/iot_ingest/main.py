"""``iot-ingest``: runs the ingest service (:mod:`iot_ingest.app`) until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc

import uvloop

from iot_common.service import run_service
from iot_common.startup import MQTT, POSTGRES, REDIS
from iot_ingest.app import build, run
from iot_ingest.settings import IngestSettings


async def serve(settings: IngestSettings, stop: asyncio.Event) -> None:
    """Run the ingest service until ``stop`` is set."""
    # Thousands of messages wait in a batch, each a few objects: rarer young-generation collections save CPU.
    gc.set_threshold(50_000, 20, 100)
    await run(await build(settings), stop)


def main() -> None:
    # uvloop: much of the per-message work is event-loop work (socket reads, futures, callbacks).
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    run_service("iot-ingest", IngestSettings, serve, needs=(POSTGRES, REDIS, MQTT))
