"""The realtime service's pure core: client frame validation, error frames, metric filtering."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from iot_common.messages import AlertEvent, StatusEvent, TelemetryEvent, decode_event, encode_event
from iot_realtime.hub import filter_event
from iot_realtime.protocol import (
    Ack,
    Auth,
    Error,
    FrameError,
    Ping,
    Pong,
    Subscribe,
    Unsubscribe,
    decode_client_frame,
    encode,
)

TS = datetime(2026, 1, 1, tzinfo=UTC)


def test_valid_frames_decode_to_their_struct() -> None:
    assert decode_client_frame(b'{"type":"ping"}', 1024) == Ping()
    assert decode_client_frame('{"type":"auth","token":"t","id":"a"}', 1024) == Auth(token="t", id="a")
    assert decode_client_frame(
        b'{"type":"subscribe","id":1,"devices":["dev-1","*"],"metrics":["temperature"]}', 1024
    ) == Subscribe(devices=["dev-1", "*"], id=1, metrics=["temperature"])
    assert decode_client_frame(
        b'{"type":"subscribe","devices":["*"],"types":["alert","status"]}', 1024
    ) == Subscribe(devices=["*"], types=["alert", "status"])
    assert decode_client_frame(b'{"type":"unsubscribe","devices":["a:b.c_d"]}', 1024) == Unsubscribe(
        devices=["a:b.c_d"]
    )


@pytest.mark.parametrize(
    ("data", "code", "frame_id"),
    [
        (b"{", "bad_json", None),
        (b'{"type":"subscribe","id":3,"devices":["a/b"]}', "bad_frame", 3),
        (b'{"type":"subscribe","id":"x","devices":["**"]}', "bad_frame", "x"),
        (b'{"type":"subscribe","id":8,"devices":["*\\n"]}', "bad_frame", 8),
        (b'{"type":"subscribe","id":9,"devices":["dev-1\\n"]}', "bad_frame", 9),
        (b'{"type":"unsubscribe","id":10,"devices":["*\\n"]}', "bad_frame", 10),
        (b'{"type":"subscribe","id":11,"devices":["a"],"metrics":["temp\\n"]}', "bad_frame", 11),
        (b'{"type":"subscribe","id":4,"devices":["a"],"metrics":["1bad"]}', "bad_frame", 4),
        (b'{"type":"subscribe","id":4,"devices":["a"],"metrics":[]}', "bad_frame", 4),
        (b'{"type":"subscribe","id":12,"devices":["*"],"types":[]}', "bad_frame", 12),
        (b'{"type":"subscribe","id":13,"devices":["*"],"types":["Alert"]}', "bad_frame", 13),
        (b'{"type":"subscribe","id":14,"devices":["*"],"types":["alert\\n"]}', "bad_frame", 14),
        (b'{"type":"ping","id":5,"unknown":1}', "bad_frame", 5),
        (b'{"type":"nope","id":6}', "bad_frame", 6),
        (b'{"id":7}', "bad_frame", 7),
        (b"[1, 2]", "bad_frame", None),
        (b'{"type":"ping","pad":"' + b"x" * 2000 + b'"}', "too_large", None),
    ],
)
def test_bad_frames_raise_the_error_the_client_gets(data: bytes, code: str, frame_id: object) -> None:
    with pytest.raises(FrameError) as caught:
        decode_client_frame(data, 1024)
    error = msgspec.json.decode(caught.value.frame())
    assert (error["type"], error["code"], error.get("id")) == ("error", code, frame_id)
    assert error["message"]


DEEP = b"[" * 3000 + b"]" * 3000


@pytest.mark.parametrize(
    ("data", "code", "frame_id"),
    [
        (b'{"type":"auth","token":"x","extra":' + DEEP + b"}", "bad_frame", None),
        (b'{"type":"ping","id":1,"extra":' + DEEP + b"}", "bad_frame", None),
        (b'{"type":"nope","id":2,"extra":' + DEEP + b"}", "bad_frame", None),
        (DEEP, "bad_frame", None),
        (b'{"type":"auth","token":"\xff"}', "bad_json", None),
    ],
)
def test_deeply_nested_or_undecodable_frames_get_an_error_not_an_exception(
    data: bytes, code: str, frame_id: object
) -> None:
    with pytest.raises(FrameError) as caught:
        decode_client_frame(data, 65536)
    error = msgspec.json.decode(caught.value.frame())
    assert (error["type"], error["code"], error.get("id")) == ("error", code, frame_id)
    assert error["message"]


def test_server_frames_omit_an_absent_id() -> None:
    assert encode(Ack()) == b'{"type":"ack"}'
    assert encode(Pong(id=2)) == b'{"type":"pong","id":2}'
    error = Error(code="c", message="m", id="x")
    assert encode(error) == b'{"type":"error","code":"c","message":"m","id":"x"}'


def test_filter_keeps_wanted_metrics_and_passes_other_events() -> None:
    both = encode_event(TelemetryEvent("d", TS, {"temperature": 1.0, "humidity": 2.0}))
    kept = filter_event(both, frozenset({"temperature"}))
    assert kept is not None
    assert decode_event(kept) == TelemetryEvent("d", TS, {"temperature": 1.0})
    assert filter_event(both, frozenset({"temperature", "humidity"})) is both
    assert filter_event(both, frozenset({"pressure"})) is None
    status = encode_event(StatusEvent("d", "online", TS))
    assert filter_event(status, frozenset({"pressure"})) is status
    alert = encode_event(AlertEvent("a", "r", "d", "temperature", "critical", "open", "hot", 91.0, 90.0, TS))
    assert filter_event(alert, frozenset({"temperature"})) is alert
    assert filter_event(alert, frozenset({"humidity"})) is None
    assert filter_event(b"not an event", frozenset({"temperature"})) is None


def test_a_type_filter_passes_only_those_event_types() -> None:
    reading = encode_event(TelemetryEvent("d", TS, {"temperature": 1.0, "humidity": 2.0}))
    status = encode_event(StatusEvent("d", "online", TS))
    alert = encode_event(AlertEvent("a", "r", "d", "temperature", "critical", "open", "hot", 91.0, 90.0, TS))
    alerts_only = frozenset({"alert"})
    assert filter_event(reading, None, alerts_only) is None
    assert filter_event(status, None, alerts_only) is None
    assert filter_event(alert, None, alerts_only) is alert
    # With a metric filter too: both apply.
    assert filter_event(alert, frozenset({"humidity"}), alerts_only) is None
    kept = filter_event(reading, frozenset({"humidity"}), frozenset({"telemetry", "alert"}))
    assert kept is not None
    assert decode_event(kept) == TelemetryEvent("d", TS, {"humidity": 2.0})
    # An event type this service does not know yet passes when it is asked for, by its type alone.
    future = b'{"type":"state","device_id":"d","desired":{},"reported":{},"delta":{},"version":1}'
    assert filter_event(future, None, frozenset({"state"})) is future
    assert filter_event(future, None, alerts_only) is None
    assert filter_event(b"not an event", None, alerts_only) is None
