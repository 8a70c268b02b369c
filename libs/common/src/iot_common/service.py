"""Entry point shared by the console scripts: settings, backends, logging, a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import errno
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import structlog

from iot_common.logging import configure_logging
from iot_common.settings import BaseSettings, SettingsError, load_settings
from iot_common.startup import (
    EXIT_PORT_IN_USE,
    EXIT_SETTINGS,
    Backend,
    BackendUnavailable,
    check_backends,
    exit_unavailable,
)

S = TypeVar("S", bound=BaseSettings)
Serve = Callable[[S, asyncio.Event], Awaitable[None]]


def run_service(
    name: str,
    settings_cls: type[S],
    serve: Serve[S],
    *,
    needs: Sequence[Backend] = (),
    uses: Sequence[Backend] = (),
) -> None:
    """Load ``settings_cls`` from the environment and run ``serve`` until SIGTERM or SIGINT.

    ``serve`` gets an event that is set on the first signal; it must then stop taking work, finish what
    it holds and return. A configuration error exits with status 2 and a message naming the variable.
    Before ``serve``, the backends in ``needs`` must answer (:func:`~iot_common.startup.check_backends`,
    within ``IOT_STARTUP_WAIT_S``), else one line names the one missing and the process exits with its
    status; those in ``uses`` only get a warning when they do not answer.
    """
    try:
        settings = load_settings(settings_cls)
    except SettingsError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_SETTINGS) from None
    configure_logging(settings.log_level, settings.log_format, service=name)
    log = structlog.stdlib.get_logger(name)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("starting")
        if await _until_stopped(check_backends(settings, log, needs, uses), stop):
            await serve(settings, stop)
        log.info("stopped")

    try:
        asyncio.run(main())
    except BackendUnavailable as exc:
        exit_unavailable(exc, log)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        log.error(f"cannot listen: {exc.strerror or exc}", exit_code=EXIT_PORT_IN_USE)
        raise SystemExit(EXIT_PORT_IN_USE) from None


async def _until_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Run ``work`` unless ``stop`` is set first (a signal while waiting for backends): whether it ran."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False
    task.result()
    return True
