"""What devices send, turned into normalized readings or clear rejects: the pure core of the ingest service.

Nothing here does I/O, so every rule is unit-tested directly. Accepted telemetry payloads (JSON):

- nested: ``{"ts": ..., "metrics": {"temperature": 21.5}}``
- flat: ``{"ts": ..., "temperature": 21.5}`` (``ts`` optional in both)
- a JSON array of either, a batch: each element is judged alone, so one bad element does not drop the rest.

``ts`` is an RFC 3339 string with an offset or epoch milliseconds; absent, the time of receipt.
"""

from __future__ import annotations

import functools
import json
import math
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Literal

import msgspec

from iot_common.messages import METRIC_NAME_PATTERN, DeviceStatus, MetricValue, Reading

RejectReason = Literal[
    "payload_too_large",
    "malformed_json",
    "invalid_shape",
    "empty_reading",
    "too_many_readings",
    "too_many_metrics",
    "invalid_metric_name",
    "invalid_value",
    "non_finite_value",
    "text_too_long",
    "invalid_timestamp",
    "timestamp_in_future",
    "timestamp_too_old",
    "invalid_status",
    "unknown_device",
    "invalid_topic",
    "storage_error",
    "invalid_command_ack",
    "invalid_state_report",
    "state_too_large",
    "too_deep",
    "retained",
    "rate_limited",
    "tenant_quota",
    "handler_error",
]
"""Why a message or a reading was refused; the ``reason`` column of ``ingest_rejects`` and a metric label."""

_METRIC_RE: Final = re.compile(METRIC_NAME_PATTERN)
_decoder: Final = msgspec.json.Decoder()
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_FLOAT_INT_MAX: Final = 2**1023
"""Integers within this bound (either sign) convert to a finite float."""
_MAX_EPOCH_MS: Final = 62_135_596_800_000
"""Epoch milliseconds of year 1 (negated) and about year 3939: within, no datetime arithmetic overflows."""


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Bounds a payload must respect; ``oldest`` is the start of the oldest telemetry partition."""

    max_payload_bytes: int = 65536
    max_readings: int = 1000
    max_metrics: int = 100
    max_text_length: int = 64
    max_future: timedelta = timedelta(minutes=10)
    retention_days: int = 30


class Reject(msgspec.Struct, frozen=True):
    """A refused message, or one refused element of a batch array (``detail`` names it)."""

    reason: RejectReason
    detail: str


class Parsed(msgspec.Struct, frozen=True):
    """The readings kept from one message and the rejects, in payload order."""

    readings: list[Reading]
    rejects: list[Reject]
    indices: list[int | None] = msgspec.field(default_factory=list)
    """Beside each reject: the position of the refused reading (0 for a body of one reading), None
    when it concerns the whole payload (malformed JSON, too many readings...)."""


class _Invalid(Exception):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason: RejectReason = reason
        self.detail = detail


def oldest_accepted(received_at: datetime, retention_days: int) -> datetime:
    """Start of the oldest daily partition that exists: older timestamps have nowhere to go."""
    return _oldest_for_day(received_at.astimezone(UTC).date(), retention_days)


@functools.lru_cache(maxsize=4)
def _oldest_for_day(today: date, retention_days: int) -> datetime:
    day = today - timedelta(days=retention_days)
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def decode_json(payload: bytes) -> Any:
    """Decode JSON; ``NaN``/``Infinity`` literals (sent by many JSON libraries) decode to floats.

    msgspec refuses those literals, so only payloads it refuses take the slower standard-library path,
    which lets the value check report a non-finite value instead of malformed JSON. Invalid UTF-8 is
    ``malformed_json``; nesting deeper than the interpreter's recursion limit (about 1,000 levels) is
    ``too_deep``: both raise something else than :class:`msgspec.DecodeError`.
    """
    try:
        return _decoder.decode(payload)
    except RecursionError:
        raise _Invalid("too_deep", "JSON nested too deep") from None
    except UnicodeDecodeError as exc:
        raise _Invalid("malformed_json", f"invalid UTF-8: {exc}") from None
    except msgspec.DecodeError as exc:
        try:
            return json.loads(payload)
        except RecursionError:
            raise _Invalid("too_deep", "JSON nested too deep") from None
        except ValueError:
            raise _Invalid("malformed_json", str(exc)) from None


def parse_telemetry(device_id: str, payload: bytes, received_at: datetime, limits: Limits) -> Parsed:
    """Validate and normalize one telemetry payload of ``device_id`` received at ``received_at`` (UTC)."""
    if len(payload) > limits.max_payload_bytes:
        detail = f"{len(payload)} bytes, limit {limits.max_payload_bytes}"
        return Parsed([], [Reject("payload_too_large", detail)], [None])
    try:
        document = decode_json(payload)
    except _Invalid as exc:
        return Parsed([], [Reject(exc.reason, exc.detail)], [None])
    bounds = (oldest_accepted(received_at, limits.retention_days), received_at + limits.max_future)
    if isinstance(document, list):
        if not document:
            return Parsed([], [Reject("empty_reading", "empty array")], [None])
        if len(document) > limits.max_readings:
            detail = f"{len(document)} readings, limit {limits.max_readings}"
            return Parsed([], [Reject("too_many_readings", detail)], [None])
        readings: list[Reading] = []
        rejects: list[Reject] = []
        indices: list[int | None] = []
        for index, element in enumerate(document):
            try:
                readings.append(_reading(device_id, element, received_at, bounds, limits))
            except _Invalid as exc:
                rejects.append(Reject(exc.reason, f"[{index}] {exc.detail}"))
                indices.append(index)
        return Parsed(readings, rejects, indices)
    try:
        return Parsed([_reading(device_id, document, received_at, bounds, limits)], [])
    except _Invalid as exc:
        return Parsed([], [Reject(exc.reason, exc.detail)], [0])


def _reading(
    device_id: str,
    element: Any,
    received_at: datetime,
    bounds: tuple[datetime, datetime],
    limits: Limits,
) -> Reading:
    if not isinstance(element, dict):
        raise _Invalid("invalid_shape", f"expected an object, got {_json_type(element)}")
    raw_ts = element.get("ts")
    if "metrics" in element:
        if len(element) > 1 + ("ts" in element):
            extra = sorted(set(element) - {"ts", "metrics"})
            raise _Invalid("invalid_shape", f"unexpected keys beside metrics: {', '.join(extra)[:200]}")
        metrics = element["metrics"]
        if not isinstance(metrics, dict):
            raise _Invalid("invalid_shape", f"metrics must be an object, got {_json_type(metrics)}")
    else:
        metrics = {k: v for k, v in element.items() if k != "ts"}
    if not metrics:
        raise _Invalid("empty_reading", "no metrics")
    if len(metrics) > limits.max_metrics:
        raise _Invalid("too_many_metrics", f"{len(metrics)} metrics, limit {limits.max_metrics}")
    ts = received_at if raw_ts is None else _timestamp(raw_ts)
    if ts > bounds[1]:
        raise _Invalid("timestamp_in_future", f"{ts.isoformat()} is after {bounds[1].isoformat()}")
    if ts < bounds[0]:
        raise _Invalid("timestamp_too_old", f"{ts.isoformat()} is before {bounds[0].isoformat()}")
    return Reading(device_id, ts, {_name(name): _value(name, v, limits) for name, v in metrics.items()})


_VALID_NAMES: Final[set[str]] = set()
"""Metric names already checked (a fleet uses few): a set lookup instead of a regular expression per
metric of every reading. Bounded: cleared when it reaches :data:`_VALID_NAMES_MAX`."""
_VALID_NAMES_MAX: Final = 10_000


def _name(name: str) -> str:
    if name in _VALID_NAMES:
        return name
    # fullmatch: a metric name is the whole string, a trailing newline ("tnl\n") included.
    if _METRIC_RE.fullmatch(name) is None:
        raise _Invalid("invalid_metric_name", f"{name[:80]!r} does not match {METRIC_NAME_PATTERN}")
    if len(_VALID_NAMES) >= _VALID_NAMES_MAX:
        _VALID_NAMES.clear()
    _VALID_NAMES.add(name)
    return name


def _value(name: str, value: Any, limits: Limits) -> MetricValue:
    kind = type(value)
    if kind is float:  # the common case first; JSON gives no NaN/inf but the standard-library fallback
        if value - value == 0.0:  # finite (inf - inf and nan - nan are nan)
            return value  # type: ignore[no-any-return]
        raise _Invalid("non_finite_value", f"{name}: {value}")
    if kind is int and -_FLOAT_INT_MAX < value < _FLOAT_INT_MAX:
        return float(value)
    # bool is an int subclass: test it first so that true becomes 1.0, not a type error.
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):  # a tuple: no union object built per call
        try:
            number = float(value)
        except OverflowError:
            raise _Invalid("non_finite_value", f"{name}: {str(value)[:40]} is out of range") from None
        if not math.isfinite(number):
            raise _Invalid("non_finite_value", f"{name}: {value}")
        return number
    if isinstance(value, str):
        if len(value) > limits.max_text_length:
            raise _Invalid(
                "text_too_long", f"{name}: {len(value)} characters, limit {limits.max_text_length}"
            )
        # PostgreSQL text refuses NUL and lone surrogates ("\ud800" in JSON): refused here, not by the
        # database, which would make the whole batch be written again one message at a time.
        if "\x00" in value or not _encodable(value):
            raise _Invalid("invalid_value", f"{name}: text with NUL or an unpaired surrogate")
        return value
    raise _Invalid("invalid_value", f"{name}: expected a number, boolean or text, got {_json_type(value)}")


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _timestamp(raw: Any) -> datetime:
    kind = type(raw)
    # Epoch ms in range (NaN and infinities fail the comparison and take the checks below).
    if (kind is int or kind is float) and -_MAX_EPOCH_MS < raw < _MAX_EPOCH_MS:
        return _EPOCH + timedelta(milliseconds=raw)
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise _Invalid("invalid_timestamp", f"ts must be RFC 3339 text or epoch ms, got {_json_type(raw)}")
    if isinstance(raw, str):
        try:
            ts = datetime.fromisoformat(raw)
        except ValueError:
            raise _Invalid("invalid_timestamp", f"{raw[:64]!r} is not RFC 3339") from None
        if ts.tzinfo is None:
            raise _Invalid("invalid_timestamp", f"{raw[:64]!r} has no UTC offset")
        return ts.astimezone(UTC)
    if not math.isfinite(raw):
        raise _Invalid("invalid_timestamp", f"ts {raw} is not finite")
    try:
        return _EPOCH + timedelta(milliseconds=raw)
    except OverflowError:
        raise _Invalid("invalid_timestamp", f"ts {raw} is out of range") from None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


_STATUSES: Final[dict[str, DeviceStatus]] = {"online": "online", "offline": "offline"}


def parse_status(payload: bytes, limits: Limits) -> DeviceStatus | Reject:
    """A status message: ``online``/``offline`` as plain text, a JSON string, or ``{"status": ...}``."""
    if len(payload) > limits.max_payload_bytes:
        return Reject("payload_too_large", f"{len(payload)} bytes, limit {limits.max_payload_bytes}")
    text = payload.decode("utf-8", errors="replace").strip()
    status = _STATUSES.get(text.lower())
    if status is None and text[:1] in ('"', "{"):
        try:
            document = decode_json(payload)
        except _Invalid as exc:
            return Reject(exc.reason, exc.detail)
        if isinstance(document, dict):
            document = document.get("status")
        if isinstance(document, str):
            status = _STATUSES.get(document.lower())
    if status is None:
        return Reject("invalid_status", f"expected online or offline, got {text[:64]!r}")
    return status
