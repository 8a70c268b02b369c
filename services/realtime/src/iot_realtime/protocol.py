"""The WebSocket protocol: client frames (validated), server frames, close codes and error codes.

Every frame is a JSON text frame with a ``type``. Device events are not defined here: they are the
``iot_common.messages`` events, forwarded from Redis as they were published. See docs/realtime.md.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final

import msgspec

from iot_common.messages import METRIC_NAME_PATTERN, MetricValue
from iot_common.topics import DEVICE_ID_PATTERN

WILDCARD: Final = "*"

# Close codes (4000-4999 are for applications; 1001 and 1011 are the standard ones).
CLOSE_GOING_AWAY: Final = 1001
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_UNAUTHORIZED: Final = 4001
CLOSE_FORBIDDEN: Final = 4003
CLOSE_TOO_SLOW: Final = 4008
CLOSE_TOO_MANY_CONNECTIONS: Final = 4029
CLOSE_TOO_MANY_FAILURES: Final = 4029
"""Same code as too many connections: "try again later" (failed API-key authentications of an address)."""

# Error codes of ``error`` frames; the connection stays open after each.
ERR_BAD_JSON: Final = "bad_json"
ERR_BAD_FRAME: Final = "bad_frame"
ERR_TOO_LARGE: Final = "too_large"
ERR_BINARY: Final = "binary_frame"
ERR_TOO_MANY: Final = "too_many_subscriptions"
ERR_ALREADY_AUTHENTICATED: Final = "already_authenticated"
ERR_UNKNOWN_DEVICE: Final = "unknown_device"
ERR_UNAVAILABLE: Final = "unavailable"
ERR_RATE_LIMITED: Final = "rate_limited"

Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
"""An RFC 3339 date-time with its offset (``Z`` or ``+hh:mm``): a time without one is ambiguous."""

FrameId = int | str | None
# msgspec checks patterns with ``re.search``; the shared patterns end in ``(?!\\n)$`` (``$`` alone would
# accept a trailing newline, as in ``"*\\n"``), which JavaScript clients of the schema read the same way.
DeviceSelector = Annotated[
    str, msgspec.Meta(pattern=f"({DEVICE_ID_PATTERN})|(^\\*(?!\\n)$)", description="a device id or '*'")
]
MetricName = Annotated[str, msgspec.Meta(pattern=METRIC_NAME_PATTERN)]
EventType = Annotated[
    str,
    msgspec.Meta(
        pattern="^[a-z][a-z_]{0,31}(?!\\n)$", description="an event type: telemetry, status, alert, ..."
    ),
]


class _ClientFrame(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    pass


class Auth(_ClientFrame, frozen=True, tag="auth"):
    token: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    id: FrameId = None
    tenant: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    """The tenant (id) to act in: only a platform admin may name another than its credential's."""


class Subscribe(_ClientFrame, frozen=True, tag="subscribe"):
    devices: Annotated[list[DeviceSelector], msgspec.Meta(min_length=1, max_length=1000)]
    id: FrameId = None
    metrics: Annotated[list[MetricName], msgspec.Meta(min_length=1, max_length=256)] | None = None
    since: Timestamp | None = None
    """Gap-free resume: the ``ts`` of the last event the client saw; the readings stored after it (of every
    device of the frame) are sent before live events (at most ``IOT_REALTIME_MAX_BACKFILL``)."""
    types: Annotated[list[EventType], msgspec.Meta(min_length=1, max_length=16)] | None = None
    """Only events of these types (``telemetry``, ``status``, ``alert``, ``command``, ...); None: all. Without
    ``telemetry``, no ``latest`` frame and no stored reading is sent either."""


class Unsubscribe(_ClientFrame, frozen=True, tag="unsubscribe"):
    devices: Annotated[list[DeviceSelector], msgspec.Meta(min_length=1, max_length=1000)]
    id: FrameId = None


class Ping(_ClientFrame, frozen=True, tag="ping"):
    id: FrameId = None


ClientFrame = Auth | Subscribe | Unsubscribe | Ping


class _IdOnly(msgspec.Struct):
    """Lenient view of a frame that failed validation, to echo its ``id`` in the error."""

    id: FrameId = None


class Ack(msgspec.Struct, frozen=True, tag="ack", tag_field="type", omit_defaults=True):
    id: FrameId = None
    backfilled: int | None = None
    """Readings sent since the subscribe frame's ``since`` (present only when it had one)."""
    truncated: bool | None = None
    """True when readings stored after ``since`` were left out: more than ``IOT_REALTIME_MAX_BACKFILL`` (the
    oldest were left out), or PostgreSQL could not be read (none were sent). Present only with ``since``."""


class Pong(msgspec.Struct, frozen=True, tag="pong", tag_field="type", omit_defaults=True):
    id: FrameId = None


class Error(msgspec.Struct, frozen=True, tag="error", tag_field="type", omit_defaults=True):
    code: str
    message: str
    id: FrameId = None
    devices: list[str] | None = None
    """The device ids the error is about (``unknown_device``)."""


class LatestMetric(msgspec.Struct, frozen=True):
    value: MetricValue
    ts: datetime


class LatestState(msgspec.Struct, frozen=True):
    """A device's current state (docs/device-state.md), as the last ``state`` event gave it."""

    desired: dict[str, Any]
    reported: dict[str, Any]
    delta: dict[str, Any]
    version: int


class Latest(msgspec.Struct, frozen=True, tag="latest", tag_field="type", omit_defaults=True):
    """A device's latest value of each metric and its current state (``state``, absent when the device
    never had one), sent on subscribe before any live event."""

    device_id: str
    metrics: dict[str, LatestMetric]
    state: LatestState | None = None


class BackfillTelemetry(msgspec.Struct, frozen=True, tag="telemetry", tag_field="type"):
    """A stored reading sent because of a subscribe frame's ``since``: the ``telemetry`` event's fields
    plus ``backfill: true``, so a client may tell it from a live one (or ignore the flag)."""

    device_id: str
    ts: datetime
    metrics: dict[str, MetricValue]
    backfill: bool = True


ServerFrame = Ack | Pong | Error | Latest | BackfillTelemetry

_client_decoder: msgspec.json.Decoder[ClientFrame] = msgspec.json.Decoder(ClientFrame)
_id_decoder = msgspec.json.Decoder(_IdOnly)
_encoder = msgspec.json.Encoder()


class FrameError(Exception):
    """A client frame that cannot be processed; becomes an ``error`` frame."""

    def __init__(self, code: str, message: str, frame_id: FrameId = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame_id = frame_id

    def frame(self) -> bytes:
        return encode(Error(code=self.code, message=self.message, id=self.frame_id))


def decode_client_frame(data: str | bytes, max_bytes: int) -> ClientFrame:
    """Validate one client frame; raise :class:`FrameError` with the code the client gets back."""
    if len(data) > max_bytes:
        raise FrameError(ERR_TOO_LARGE, f"frame larger than {max_bytes} bytes")
    try:
        return _client_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise FrameError(ERR_BAD_FRAME, str(exc), _frame_id(data)) from None
    except msgspec.DecodeError as exc:
        raise FrameError(ERR_BAD_JSON, str(exc)) from None
    except RecursionError:
        raise FrameError(ERR_BAD_JSON, "JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError(ERR_BAD_JSON, f"not UTF-8 JSON: {exc}") from None


def _frame_id(data: str | bytes) -> FrameId:
    """The frame's ``id`` if it can be read, else None (never raises: called on frames already refused)."""
    try:
        return _id_decoder.decode(data).id
    except (msgspec.MsgspecError, RecursionError, ValueError):
        return None


def encode(frame: ServerFrame) -> bytes:
    return _encoder.encode(frame)
