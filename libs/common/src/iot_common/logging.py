"""structlog set-up: JSON lines in production, a readable console on a terminal.

The console format has colours only on a terminal: piped into a file or another program (``make run``
prefixes each line with its process), it is plain text. ``NO_COLOR`` (https://no-color.org) turns
colours off everywhere, ``FORCE_COLOR`` on even without a terminal.

Context such as a request or message id is bound with :func:`bind_context` and appears on every line logged
in that task. Standard-library loggers (uvicorn, aiohttp, gmqtt) go through the same renderer.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import msgspec
import structlog

from iot_common.settings import LogFormat, LogLevel


def _json_dumps(obj: Any, **_: Any) -> str:
    return msgspec.json.encode(obj, enc_hook=str).decode()


def use_colours(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether console lines written to ``stream`` get ANSI colours: on a terminal, unless ``NO_COLOR``
    is set (not empty); ``FORCE_COLOR`` (not empty) forces them."""
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR"):
        return False
    if env.get("FORCE_COLOR"):
        return True
    try:
        return stream.isatty()
    except ValueError:  # a closed stream
        return False


def configure_logging(level: LogLevel = "info", fmt: LogFormat = "auto", service: str = "") -> None:
    """Route structlog and stdlib logging to stderr in ``fmt`` (``auto``: console on a terminal)."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if service:
        shared.insert(0, _add_service(service))
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=use_colours(sys.stderr))
        if use_console
        else structlog.processors.JSONRenderer(serializer=_json_dumps)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *([] if use_console else [structlog.processors.format_exc_info]),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    numeric = getattr(logging, level.upper())
    root.setLevel(numeric)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )


def _add_service(service: str) -> Any:
    def processor(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("service", service)
        return event

    return processor


def bind_context(**values: Any) -> None:
    """Bind values (request_id, message_id, device_id...) to every log line of the current task."""
    structlog.contextvars.bind_contextvars(**values)


def clear_context() -> None:
    structlog.contextvars.clear_contextvars()


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
