"""Entry point shared by the console scripts: settings, logging, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from iot_common.logging import configure_logging
from iot_common.settings import BaseSettings, SettingsError, load_settings

S = TypeVar("S", bound=BaseSettings)
Serve = Callable[[S, asyncio.Event], Awaitable[None]]


def run_service(name: str, settings_cls: type[S], serve: Serve[S]) -> None:
    """Load ``settings_cls`` from the environment and run ``serve`` until SIGTERM or SIGINT.

    ``serve`` gets an event that is set on the first signal; it must then stop taking work, finish what
    it holds and return. A configuration error exits with status 2 and a message naming the variable.
    """
    try:
        settings = load_settings(settings_cls)
    except SettingsError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format, service=name)
    log = structlog.stdlib.get_logger(name)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("starting")
        await serve(settings, stop)
        log.info("stopped")

    asyncio.run(main())
