"""Settings of the API service, read from ``IOT_*`` variables (see docs/configuration.md)."""

from __future__ import annotations

import itertools
import re
from typing import Annotated
from urllib.parse import unquote, urlsplit

import msgspec

from iot_api.rollup import RollupRetention
from iot_common.db.rollups import LATE_AFTER
from iot_common.settings import Port, WebSettings
from iot_common.weak_secrets import is_placeholder

BOOTSTRAP_KEY_PATTERN = r"^iotk_[A-Za-z0-9-]{12}_[A-Za-z0-9_-]{16,}(?!\n)$"
# One CSP source expression: scheme, host (an optional leading *.), optional port and path.
CONNECT_SOURCE_PATTERN = r"^(wss?|https?)://(\*\.)?[A-Za-z0-9.-]+(:\d{1,5})?(/[A-Za-z0-9._~/-]*)?(?!\n)$"
SERVICE_USER_PATTERN = r"^[A-Za-z0-9_.-]{1,64}:(ingest|api|sim):[^,\s]{16,}(?!\n)$"
REALTIME_PATH = "/ws"
"""Where the realtime service serves its WebSocket (``iot_realtime.app``)."""
# IOT_PUBLIC_REALTIME_URL: ws(s)://host[:port][/path], or /path on the dashboard's own host (not //: that
# names another host). The origin goes into the dashboard's CSP header: a host name or an IP literal only.
_PUBLIC_REALTIME_URL_RE = re.compile(
    r"(?:(?P<origin>wss?://(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::(?P<port>\d{1,5}))?)"
    r"(?P<url_path>/[A-Za-z0-9._~/-]*)?|(?P<path>/(?!/)[A-Za-z0-9._~/-]*))"
)


class ApiSettings(WebSettings, frozen=True, kw_only=True):
    api_port: Port = 8000
    bootstrap_api_key: Annotated[
        str,
        msgspec.Meta(
            pattern=f"({BOOTSTRAP_KEY_PATTERN})|^(?!\\n)$",
            description="API key iotk_<12 letters, digits or -><at least 16 letters, digits, _ or ->",
        ),
    ] = ""
    bootstrap_admin_email: str = ""
    bootstrap_admin_password: str = ""
    api_access_token_ttl_s: Annotated[int, msgspec.Meta(ge=30, le=86400)] = 900
    api_refresh_ttl_s: Annotated[int, msgspec.Meta(ge=60, le=90 * 86400)] = 7 * 86400
    api_realtime_token_ttl_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 60
    api_rate_limit_per_minute: Annotated[int, msgspec.Meta(ge=0)] = 1200
    api_auth_failures_per_minute: Annotated[int, msgspec.Meta(ge=0)] = 30
    api_login_failures_per_account: Annotated[int, msgspec.Meta(ge=0)] = 10
    api_login_failures_per_address: Annotated[int, msgspec.Meta(ge=0)] = 30
    api_password_hash_workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    api_password_hash_queue: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 8
    api_max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=100_000_000)] = 1_048_576
    api_cache_ttl_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 10
    api_cache_namespace: Annotated[str, msgspec.Meta(pattern=r"\A(?:[A-Za-z0-9:_.-]{1,64})?\Z")] = ""
    """Start of the API's Redis keys; empty (the default): ``{IOT_REDIS_PREFIX}:api:``. Kept for
    deployments that set it before ``IOT_REDIS_PREFIX`` existed."""
    api_rollup_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    api_rollup_lag_s: Annotated[int, msgspec.Meta(ge=0, le=86400)] = 120
    api_rollup_refresh_hours: Annotated[int, msgspec.Meta(ge=0, le=168)] = 1
    rollup_retention_days_minute: Annotated[int, msgspec.Meta(ge=1, le=36500)] = 30
    """Days the minute rollup keeps its rows: at least ``IOT_TELEMETRY_RETENTION_DAYS``."""
    rollup_retention_days_hour: Annotated[int, msgspec.Meta(ge=1, le=36500)] = 400
    """Days the hour rollup keeps its rows: at least the minute rollup's."""
    rollup_retention_days_day: Annotated[int, msgspec.Meta(ge=1, le=36500)] = 3650
    """Days the day rollup keeps its rows: at least the hour rollup's."""
    audit_retention_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 90
    """How long the audit log (``GET /api/v1/audit``) keeps each event."""
    dashboard_dir: str = ""
    public_realtime_url: str = ""
    """Where browsers reach the realtime service (the dashboard's ``config.json``): a ws:// or wss:// URL,
    or a path on the dashboard's own host such as ``/ws`` behind an Ingress; empty: the page guesses."""
    dashboard_connect_src: list[
        Annotated[
            str,
            msgspec.Meta(
                pattern=CONNECT_SOURCE_PATTERN,
                description="CSP source the dashboard may connect to, e.g. wss://rt.example.com",
            ),
        ]
    ] = msgspec.field(default_factory=list)
    api_max_points_per_response: Annotated[int, msgspec.Meta(ge=100, le=100_000)] = 20_000
    api_max_heavy_reads_per_principal: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2
    api_import_max_rows: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 100_000
    """Devices per ``POST /api/v1/devices/import``."""
    api_import_max_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1_000_000_000)] = 64 * 1024 * 1024
    """Body of ``POST /api/v1/devices/import`` (other requests: ``IOT_API_MAX_BODY_BYTES``)."""
    api_import_max_broker_devices: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 1000
    """Devices with credentials per import while the API provisions Mosquitto (``IOT_MQTT_ADMIN_URL``)."""
    api_export_max_days: Annotated[int, msgspec.Meta(ge=1, le=3660)] = 366
    """Longest time range of one ``GET /api/v1/telemetry/export``."""
    api_command_ttl_s: Annotated[int, msgspec.Meta(ge=1, le=7 * 86400)] = 300
    api_command_puback_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 5.0
    mqtt_admin_url: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^(?!\n)$|^mqtts?://[^\s:@/]+:[^\s@/]*@[^\s:@/]+(:\d{1,5})?/?(?!\n)$",
            description="MQTT URL with the dynsec admin's user and password, mqtt://admin:password@host:port",
        ),
    ] = ""
    mqtt_hook_secret: Annotated[str, msgspec.Meta(pattern=r"^(?!\n)$|^\S{16,}(?!\n)$")] = ""
    mqtt_service_users: list[
        Annotated[
            str,
            msgspec.Meta(
                pattern=SERVICE_USER_PATTERN,
                description="username:role:password, role ingest|api|sim, password of 16+ characters",
            ),
        ]
    ] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_rollups()
        users = [entry.split(":", 1)[0] for entry in self.mqtt_service_users]
        if len(set(users)) != len(users):
            raise ValueError("mqtt_service_users names a user twice")
        if bool(self.bootstrap_admin_email) != bool(self.bootstrap_admin_password):
            raise ValueError("bootstrap_admin_email and bootstrap_admin_password go together")
        if self.bootstrap_admin_password and len(self.bootstrap_admin_password) < 8:
            raise ValueError("bootstrap_admin_password must have at least 8 characters")
        if self.bootstrap_admin_password and is_placeholder(self.bootstrap_admin_password):
            raise ValueError("IOT_BOOTSTRAP_ADMIN_PASSWORD is a published example value: choose another")
        # The other secrets the API holds: none may be a published placeholder (REPLACE_ME, changeme...).
        if self.mqtt_hook_secret and is_placeholder(self.mqtt_hook_secret):
            raise ValueError("IOT_MQTT_HOOK_SECRET is a published placeholder or example value")
        if any(is_placeholder(entry.split(":", 2)[2]) for entry in self.mqtt_service_users):
            raise ValueError("IOT_MQTT_SERVICE_USERS has a published placeholder or example password")
        if self.mqtt_admin_url and is_placeholder(unquote(urlsplit(self.mqtt_admin_url).password or "")):
            raise ValueError("IOT_MQTT_ADMIN_URL has a published placeholder or example password")
        if self.public_realtime_url:
            _check_public_realtime_url(self.public_realtime_url)

    def _check_rollups(self) -> None:
        """Each rollup level keeps at least what it is computed from; the job's lag leaves ingest time to
        mark late readings (``iot_common.db.rollups``)."""
        chain = [
            ("IOT_TELEMETRY_RETENTION_DAYS", self.telemetry_retention_days),
            ("IOT_ROLLUP_RETENTION_DAYS_MINUTE", self.rollup_retention_days_minute),
            ("IOT_ROLLUP_RETENTION_DAYS_HOUR", self.rollup_retention_days_hour),
            ("IOT_ROLLUP_RETENTION_DAYS_DAY", self.rollup_retention_days_day),
        ]
        for (finer, finer_days), (coarser, coarser_days) in itertools.pairwise(chain):
            if coarser_days < finer_days:
                raise ValueError(
                    f"{coarser}={coarser_days} is less than {finer}={finer_days}: a rollup level must keep"
                    f" its rows at least as long as the level it is computed from; raise {coarser}"
                )
        late = int(LATE_AFTER.total_seconds())
        if self.api_rollup_lag_s < late:
            raise ValueError(
                f"IOT_API_ROLLUP_LAG_S={self.api_rollup_lag_s} is less than {late}: ingest marks readings"
                f" late for the rollup only when they are {late} s old"
            )

    def rollup_retention(self) -> RollupRetention:
        return RollupRetention(
            self.rollup_retention_days_minute, self.rollup_retention_days_hour, self.rollup_retention_days_day
        )

    def realtime_url(self) -> str | None:
        """The realtime endpoint the dashboard connects to: ``IOT_PUBLIC_REALTIME_URL``, given the service's
        ``/ws`` path when it has none; ``None`` when unset."""
        url = self.public_realtime_url
        if not url:
            return None
        match = _PUBLIC_REALTIME_URL_RE.fullmatch(url)
        if match is not None and match.group("origin") and not match.group("url_path"):
            return url + REALTIME_PATH
        return url

    def cache_namespace(self) -> str:
        """Start of the API's Redis keys: ``IOT_API_CACHE_NAMESPACE``, else ``{IOT_REDIS_PREFIX}:api:``."""
        return self.api_cache_namespace or self.redis_names().api_cache_namespace


def _check_public_realtime_url(url: str) -> None:
    """Raise a ``ValueError`` naming ``IOT_PUBLIC_REALTIME_URL`` when ``url`` is neither a WebSocket URL nor
    a path."""
    name = "IOT_PUBLIC_REALTIME_URL"
    expected = (
        "expected a ws:// or wss:// URL such as ws://localhost:8001/ws,"
        " or a path on the dashboard's own host such as /ws"
    )
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"{name}: {url!r} is not a URL: {expected}") from None
    if "@" in parts.netloc:
        raise ValueError(f"{name} must not hold a user or password: {expected}")
    if parts.scheme and parts.scheme not in ("ws", "wss"):
        raise ValueError(f"{name}: {parts.scheme}:// is not a WebSocket scheme: {expected}")
    if "?" in url or "#" in url:
        raise ValueError(f"{name}: {url!r} has a query or fragment (the dashboard adds ?token=): {expected}")
    match = _PUBLIC_REALTIME_URL_RE.fullmatch(url)
    if match is None:
        raise ValueError(f"{name}: {url!r} is not valid: {expected}")
    port = match.group("port")
    if port is not None and not 1 <= int(port) <= 65535:
        raise ValueError(f"{name}: port {port} is not between 1 and 65535")
