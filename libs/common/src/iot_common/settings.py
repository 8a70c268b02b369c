"""Service configuration read from ``IOT_*`` environment variables and validated with msgspec.

Each service declares one frozen Struct that extends :class:`BaseSettings`; field ``foo_bar`` is read from
``IOT_FOO_BAR``. A wrong value stops start-up with a :class:`SettingsError` that names the variable.
"""

from __future__ import annotations

import ipaddress
import os
import re
import typing
from collections.abc import Mapping
from typing import Annotated, Literal, TypeVar

import msgspec

from iot_common.topics import DEFAULT_REDIS_PREFIX, REDIS_PREFIX_PATTERN, RedisNames
from iot_common.weak_secrets import MIN_SECRET_BYTES, weak_secret_problem

ENV_PREFIX = "IOT_"
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PostgresUrl = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^postgres(ql)?://[^\s/?#]*(/[^\s?#]*)?(\?\S*)?(?!\n)$",
        description="PostgreSQL URL, postgresql://user[:password]@host[:port]/database",
    ),
]
RedisUrl = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^rediss?(\+cluster)?://[^\s/?#]*(/\d*)?(\?\S*)?(?!\n)$",
        description=(
            "Redis URL, redis://[user:password@]host[:port]/db, or a Redis Cluster: "
            "redis+cluster://[user:password@]host:port[,host:port...]"
        ),
    ),
]
MqttUrl = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^mqtts?://([^\s:@/]+(:[^\s@/]*)?@)?[^\s:@/]+(:\d{1,5})?/?(?!\n)$",
        description="MQTT URL, mqtt://[user:password@]host[:port] (mqtts:// for TLS)",
    ),
]
RedisPrefix = Annotated[
    str,
    msgspec.Meta(
        pattern=REDIS_PREFIX_PATTERN,
        description="1 to 32 letters, digits, '_', '.' or '-' (no ':')",
    ),
]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
BindHost = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z0-9.:-]{1,253}(?!\n)$",
        description="address a service's HTTP listener binds: 0.0.0.0 (every interface), 127.0.0.1, ::",
    ),
]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["json", "console", "auto"]


class SettingsError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


class BaseSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings every service reads."""

    database_url: PostgresUrl = "postgresql://postgres@127.0.0.1:5432/postgres"
    redis_url: RedisUrl = "redis://127.0.0.1:6379/0"
    redis_prefix: RedisPrefix = DEFAULT_REDIS_PREFIX
    """Start of every Redis key and channel name: deployments sharing a Redis server need distinct ones."""
    mqtt_url: MqttUrl = "mqtt://127.0.0.1:1883"
    log_level: LogLevel = "info"
    log_format: LogFormat = "auto"
    database_pool_min: Annotated[int, msgspec.Meta(ge=0, le=100)] = 1
    database_pool_max: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10
    telemetry_retention_days: Annotated[int, msgspec.Meta(ge=1, le=36500)] = 30
    telemetry_partitions_ahead_days: Annotated[int, msgspec.Meta(ge=1, le=365)] = 7
    startup_wait_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 0.0
    """How long start-up waits for PostgreSQL, Redis and the broker to answer (0: fail at once)."""

    def __post_init__(self) -> None:
        if self.database_pool_min > self.database_pool_max:
            raise ValueError("database_pool_min must not exceed database_pool_max")

    def redis_names(self) -> RedisNames:
        """This deployment's Redis key and channel names (``IOT_REDIS_PREFIX``)."""
        return RedisNames(self.redis_prefix)


class WebSettings(BaseSettings, frozen=True, kw_only=True):
    """Settings shared by the services browsers talk to (API and realtime)."""

    bind_host: BindHost = "0.0.0.0"
    """Address the HTTP listener binds (``IOT_BIND_HOST``); ``make run`` sets 127.0.0.1."""

    jwt_secret: str = ""
    """Signs and verifies access tokens: required, no default (see :mod:`iot_common.weak_secrets`)."""
    cors_origins: list[str] = msgspec.field(
        default_factory=lambda: ["http://localhost:8000", "http://127.0.0.1:8000"]
    )
    trusted_proxies: list[
        Annotated[
            str,
            msgspec.Meta(
                pattern=r"^[0-9A-Fa-f.:]+(/\d{1,3})?(?!\n)$",
                description="IP address or CIDR network of a reverse proxy whose X-Forwarded-For is believed",
            ),
        ]
    ] = msgspec.field(default_factory=list)
    """Peers whose ``X-Forwarded-For`` names the client (the Ingress controller); none by default."""

    def trusted_networks(self) -> list[IPNetwork]:
        return [ipaddress.ip_network(proxy, strict=False) for proxy in self.trusted_proxies]

    def __post_init__(self) -> None:
        super().__post_init__()
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"IOT_TRUSTED_PROXIES: {proxy!r} is not an IP address or network") from None
        problem = weak_secret_problem(self.jwt_secret)
        if problem is not None:
            raise ValueError(
                f"{env_name('jwt_secret')} {problem}: give the API and realtime services the same random "
                f"value of at least {MIN_SECRET_BYTES} bytes, e.g. `openssl rand -base64 48`"
            )


S = TypeVar("S", bound=BaseSettings)

_PATH_RE = re.compile(r"`\$\.(\w+)[^`]*`")
_SEQUENCE_ORIGINS = (list, tuple, set, frozenset)


def env_name(field: str) -> str:
    """The environment variable that carries ``field``."""
    return ENV_PREFIX + field.upper()


def _is_sequence(tp: object) -> bool:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _is_sequence(typing.get_args(tp)[0])
    return origin in _SEQUENCE_ORIGINS or tp in _SEQUENCE_ORIGINS


def load_settings(cls: type[S], environ: Mapping[str, str] | None = None) -> S:
    """Build ``cls`` from ``IOT_*`` variables; unset variables keep their defaults.

    List-valued settings are comma separated. Raises :class:`SettingsError` naming the variable.
    """
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls, include_extras=True)
    raw: dict[str, object] = {}
    for field in msgspec.structs.fields(cls):
        name = env_name(field.name)
        if name not in env:
            continue
        value = env[name]
        if _is_sequence(hints[field.name]):
            raw[field.name] = [part.strip() for part in value.split(",") if part.strip()]
        else:
            raw[field.name] = value
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid configuration: {_explain(str(exc), hints, raw)}") from None


def _explain(error: str, hints: dict[str, object], raw: Mapping[str, object]) -> str:
    """Rewrite msgspec's ``... - at `$.field``` into a message naming the variable and what it expects."""
    if error.startswith(ENV_PREFIX):
        return error  # already names its variable (a check in __post_init__)
    match = _PATH_RE.search(error)
    if match is None:
        names = ", ".join(sorted(env_name(k) for k in raw)) or "defaults"
        return f"{error} (checking {names})"
    field = match.group(1)
    problem = error[: error.rfind(" - at ")]
    description = _description(hints.get(field))
    if description and "matching regex" in problem:
        problem = f"expected {description}"
    return f"{env_name(field)}: {problem}"


def _description(tp: object) -> str | None:
    if typing.get_origin(tp) is Annotated:
        for meta in typing.get_args(tp)[1:]:
            if isinstance(meta, msgspec.Meta) and meta.description:
                return meta.description
    return None
