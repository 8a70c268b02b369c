"""Start-up checks: wait for the backends a service needs, or stop with one line and a known exit code.

Each service names the backends it cannot start without. Each is tried once (``IOT_STARTUP_WAIT_S=0``,
the default: fail fast), or again with backoff until ``IOT_STARTUP_WAIT_S`` seconds have passed, logging
one line per failed attempt. A backend that still does not answer, or refuses the login, stops the
process with one line naming the backend, its variable and ``host:port`` (never the user or password),
and the backend's exit status, the same in every service and in ``iot-migrate``:

====  ==========================================================
1     any other failure (the log says what)
2     invalid configuration (a variable is missing or malformed)
10    PostgreSQL (``IOT_DATABASE_URL``)
11    Redis (``IOT_REDIS_URL``)
12    MQTT broker (``IOT_MQTT_URL``)
13    PostgreSQL answers, but its schema is missing or older than this release (run ``iot-migrate``)
14    a port to listen on is taken
====  ==========================================================

A backend a service can run without (the API's Redis and broker) is tried once, and a warning names it.
The retries (tenacity, exponential backoff with jitter) are in :func:`wait_for_backend` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg
import redis.exceptions as redis_exceptions
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from iot_common.mqtt import MqttEndpoint
from iot_common.redis_client import create_redis
from iot_common.settings import BaseSettings, env_name

EXIT_FAILURE: Final = 1
EXIT_SETTINGS: Final = 2
EXIT_POSTGRES: Final = 10
EXIT_REDIS: Final = 11
EXIT_MQTT: Final = 12
EXIT_SCHEMA: Final = 13
EXIT_PORT_IN_USE: Final = 14

PROBE_TIMEOUT_S: Final = 5.0
"""How long one attempt may take: a host that drops packets costs this much per attempt."""
_BACKOFF = wait_exponential_jitter(multiplier=0.5, max=5.0, jitter=0.5)
_DEFAULT_PORTS: Final = {
    "postgresql": 5432,
    "postgres": 5432,
    "redis": 6379,
    "rediss": 6379,
    "mqtt": 1883,
    "mqtts": 8883,
}

Logger = structlog.stdlib.BoundLogger


class NoAnswer(Exception):
    """The backend did not answer this attempt (refused connection, timeout, still starting): retried."""


class NotMigrated(NoAnswer):
    """PostgreSQL answers, but without this release's schema: waited for (a migration job may be running)."""


class Refused(Exception):
    """The backend answered and refused (wrong password, unknown database, bad certificate): not retried."""


Probe = Callable[[str, float], Awaitable[None]]


@dataclass(frozen=True)
class Backend:
    """A backing service, the setting that locates it, and the exit status when it is missing."""

    name: str
    setting: str
    exit_code: int
    probe: Probe

    @property
    def variable(self) -> str:
        return env_name(self.setting)


class BackendUnavailable(Exception):
    """A required backend did not answer in time, or refused; ``str()`` is the one line to log."""

    def __init__(
        self,
        backend: Backend,
        url: str,
        error: str,
        *,
        refused: bool,
        attempts: int,
        waited_s: float,
        not_migrated: bool = False,
    ) -> None:
        self.backend = backend
        self.address = address(url)
        self.error = error
        self.attempts = attempts
        self.not_migrated = not_migrated
        where = f"at {self.address} ({backend.variable})"
        if not_migrated:
            message = f"{backend.name} {where} is not ready for this release: {error}"
        elif refused:
            message = f"{backend.name} {where} refused the connection: {error}"
        else:
            message = f"{backend.name} does not answer {where}: {error}"
            if attempts > 1:
                message += f" (still after {attempts} attempts in {waited_s:.0f} s)"
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        return EXIT_SCHEMA if self.not_migrated else self.backend.exit_code


def address(url: str) -> str:
    """``host:port`` of a backend URL (default port filled in), never its user or password."""
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # several hosts, postgresql://a:5432,b:5432/db
        return parts.netloc.rpartition("@")[2]
    if not host:
        host = parse_qs(parts.query).get("host", ["localhost"])[0]
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port or _DEFAULT_PORTS.get(parts.scheme, '?')}"


def _describe(exc: BaseException, url: str) -> str:
    """The error as one short line, with the URL's password (should a library echo it) masked."""
    text = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    if isinstance(exc, TimeoutError):
        text = f"no answer within {PROBE_TIMEOUT_S:g} s"
    password = urlsplit(url).password
    if password:
        for secret in {password, unquote(password)}:
            text = text.replace(secret, "***")
    return text[:300]


async def _probe_postgres(url: str, timeout: float) -> None:
    """A login, then this release's schema: every migration it ships is applied."""
    await _probe_postgres_server(url, timeout, schema=True)


async def _probe_postgres_login(url: str, timeout: float) -> None:
    await _probe_postgres_server(url, timeout, schema=False)


async def _probe_postgres_server(url: str, timeout: float, *, schema: bool) -> None:
    try:
        conn = await asyncpg.connect(url, timeout=timeout)
    except (
        OSError,
        TimeoutError,
        asyncpg.CannotConnectNowError,  # "the database system is starting up"
        asyncpg.TooManyConnectionsError,
    ) as exc:
        raise NoAnswer(_describe(exc, url)) from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise Refused(_describe(exc, url)) from None
    try:
        if schema:
            await _check_schema(conn)
    finally:
        await conn.close(timeout=timeout)


async def _check_schema(conn: asyncpg.Connection) -> None:
    from iot_common.db.migrate import load_migrations  # here: migrate imports this module

    needed = max(m.version for m in load_migrations())
    try:
        current = await conn.fetchval("SELECT max(version) FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        current = None
    if current is None or current < needed:
        found = "no schema" if current is None else f"schema version {current}"
        raise NotMigrated(f"the database has {found}, this release needs version {needed}: run iot-migrate")


async def _probe_redis(url: str, timeout: float) -> None:
    client = create_redis(
        url, socket_connect_timeout=timeout, socket_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )
    try:
        await client.ping()
    except (redis_exceptions.ClusterDownError, redis_exceptions.RedisClusterException) as exc:
        # A cluster still forming, or none of its seed nodes answering: wait, as for a single server.
        raise NoAnswer(_describe(exc, url)) from None
    except (
        redis_exceptions.AuthenticationError,
        redis_exceptions.AuthorizationError,
        redis_exceptions.ResponseError,
    ) as exc:
        raise Refused(_describe(exc, url)) from None
    except (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError, OSError) as exc:
        raise NoAnswer(_describe(exc, url)) from None
    finally:
        await client.aclose()


async def _probe_mqtt(url: str, timeout: float) -> None:
    """A TCP connection (and TLS handshake for ``mqtts``): the service's own client logs in afterwards."""
    endpoint = MqttEndpoint.parse(url)
    context = ssl.create_default_context() if endpoint.tls else None
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(endpoint.host, endpoint.port, ssl=context), timeout
        )
    except ssl.SSLCertVerificationError as exc:
        raise Refused(_describe(exc, url)) from None
    except (OSError, TimeoutError) as exc:
        raise NoAnswer(_describe(exc, url)) from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


POSTGRES: Final = Backend("PostgreSQL", "database_url", EXIT_POSTGRES, _probe_postgres)
"""PostgreSQL with this release's schema, as the services need it."""
POSTGRES_LOGIN: Final = Backend("PostgreSQL", "database_url", EXIT_POSTGRES, _probe_postgres_login)
"""PostgreSQL that accepts the login, schema or not (``iot-migrate``)."""
REDIS: Final = Backend("Redis", "redis_url", EXIT_REDIS, _probe_redis)
MQTT: Final = Backend("MQTT broker", "mqtt_url", EXIT_MQTT, _probe_mqtt)


async def wait_for_backend(backend: Backend, url: str, wait_s: float, log: Logger) -> None:
    """Return once ``backend`` answers at ``url``; retry with backoff for up to ``wait_s`` seconds.

    Raises :class:`BackendUnavailable` when time is up, or at once when the backend refuses the login.
    """
    started = time.monotonic()
    deadline = started + wait_s
    where = f"at {address(url)} ({backend.variable})"

    def capped_backoff(state: RetryCallState) -> float:
        return min(_BACKOFF(state), max(0.0, deadline - time.monotonic()))

    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        state_of = "is not ready" if isinstance(error, NotMigrated) else "does not answer"
        log.warning(
            f"{backend.name} {state_of} {where}, retrying in {delay:.1f} s",
            error=str(error),
            attempt=state.attempt_number,
            waited_s=round(time.monotonic() - started, 1),
            wait_s=round(wait_s, 1),
        )

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(NoAnswer),
        stop=lambda _: time.monotonic() >= deadline,
        wait=capped_backoff,
        before_sleep=log_retry,
        reraise=True,
    )
    attempts = 0
    try:
        async for attempt in retrying:
            attempts = attempt.retry_state.attempt_number
            with attempt:
                await backend.probe(url, PROBE_TIMEOUT_S)
    except (NoAnswer, Refused) as exc:
        raise BackendUnavailable(
            backend,
            url,
            str(exc),
            refused=isinstance(exc, Refused),
            attempts=attempts,
            waited_s=time.monotonic() - started,
            not_migrated=isinstance(exc, NotMigrated),
        ) from None
    if attempts > 1:
        log.info(f"{backend.name} answers {where}", attempts=attempts)


async def check_backends(
    settings: BaseSettings,
    log: Logger,
    needs: Sequence[Backend] = (),
    uses: Sequence[Backend] = (),
) -> None:
    """Wait for each backend in ``needs`` (:func:`wait_for_backend`), all within one ``IOT_STARTUP_WAIT_S``;
    try each in ``uses`` once and log a warning naming it when it does not answer (the service starts
    without it)."""
    deadline = time.monotonic() + settings.startup_wait_s
    for backend in needs:
        remaining = max(0.0, deadline - time.monotonic())
        await wait_for_backend(backend, getattr(settings, backend.setting), remaining, log)
    for backend in uses:
        try:
            await wait_for_backend(backend, getattr(settings, backend.setting), 0, log)
        except BackendUnavailable as exc:
            log.warning(f"{exc}; starting without it", variable=backend.variable, address=exc.address)


def exit_unavailable(exc: BackendUnavailable, log: Logger) -> NoReturn:
    """Log ``exc`` as its one line and exit with the backend's status."""
    log.error(
        str(exc),
        backend=exc.backend.name,
        variable=exc.backend.variable,
        address=exc.address,
        exit_code=exc.exit_code,
    )
    raise SystemExit(exc.exit_code) from None


def log_listening(log: Logger, host: str, port: int) -> None:
    """The line every service logs once it accepts connections."""
    log.info("listening", address=f"{host}:{port}")
