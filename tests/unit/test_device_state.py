"""Device state contract: RFC 7386 merge patch (the RFC's appendix examples), delta, limits, messages."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from iot_common.messages import StateEvent, decode_event, encode_event
from iot_common.state import (
    MAX_STATE_BYTES,
    MAX_STATE_DEPTH,
    DesiredMessage,
    StateProblem,
    check_document,
    compute_delta,
    decode_reported,
    encode_desired,
    merge_patch,
)
from iot_common.topics import STATE_REPORTED_FILTER, state_desired_topic, state_reported_topic

# RFC 7386, Appendix A: (original, patch, result).
RFC7386_EXAMPLES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("original", "patch", "result"), RFC7386_EXAMPLES)
def test_merge_patch_rfc7386_appendix(original: Any, patch: Any, result: Any) -> None:
    snapshot = msgspec.json.encode(original)
    assert merge_patch(original, patch) == result
    assert msgspec.json.encode(original) == snapshot  # the target is not modified


def test_delta_holds_desired_keys_whose_reported_value_differs() -> None:
    desired = {"target_temperature": 21.5, "mode": "eco", "led": {"color": "red", "on": True}}
    reported = {"target_temperature": 21.5, "mode": "comfort", "led": {"color": "red", "on": False}, "x": 1}
    assert compute_delta(desired, reported) == {"mode": "eco", "led": {"on": True}}
    assert compute_delta(desired, desired) == {}
    assert compute_delta({"a": {"b": 1}}, {}) == {"a": {"b": 1}}
    assert compute_delta({"a": {"b": 1}}, {"a": 5}) == {"a": {"b": 1}}
    assert compute_delta({"n": 1}, {"n": 1.0}) == {}
    assert compute_delta({"flag": 1}, {"flag": True}) == {"flag": 1}
    assert compute_delta({"list": [1, 2]}, {"list": [1, 2]}) == {}
    assert compute_delta({"list": [1, 2]}, {"list": [2, 1]}) == {"list": [1, 2]}


def nested(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for _ in range(depth - 1):
        doc = {"k": doc}
    return doc


def test_limits_name_the_field() -> None:
    check_document(nested(MAX_STATE_DEPTH), "desired")
    with pytest.raises(StateProblem) as deep:
        check_document(nested(MAX_STATE_DEPTH + 1), "desired")
    assert deep.value.code == "too_deep"
    assert deep.value.field.startswith("desired.k")
    with pytest.raises(StateProblem) as large:
        check_document({"blob": "x" * MAX_STATE_BYTES}, "desired")
    assert large.value.code == "too_large"
    with pytest.raises(StateProblem) as nul:
        check_document({"a": {"b": "x\x00"}}, "desired")
    assert nul.value.field == "desired.a.b"
    with pytest.raises(StateProblem) as not_object:
        check_document([1], "desired")
    assert not_object.value.code == "invalid"
    with pytest.raises(StateProblem):
        check_document({"k" * 129: 1}, "desired")


def test_reported_message_parsing() -> None:
    message = decode_reported(b'{"reported": {"target_temperature": 21.5}, "version": 3}')
    assert message.reported == {"target_temperature": 21.5}
    assert message.version == 3
    assert decode_reported(b'{"reported": {}}').version is None
    for bad in (b"nope", b'{"reported": 1}', b'{"desired": {}}', b'{"reported": {}, "version": "x"}'):
        with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
            decode_reported(bad)
    with pytest.raises(StateProblem):
        decode_reported(b'{"reported": {}, "version": -1}')
    with pytest.raises(StateProblem):
        decode_reported(msgspec.json.encode({"reported": nested(MAX_STATE_DEPTH + 1)}))
    with pytest.raises(StateProblem):
        decode_reported(b" " * (MAX_STATE_BYTES + 100))


def test_messages_and_topics() -> None:
    assert state_desired_topic("dev-1") == "devices/state/dev-1/desired"
    assert state_reported_topic("dev-1") == "devices/state/dev-1/reported"
    assert STATE_REPORTED_FILTER == "devices/state/+/reported"
    desired = msgspec.json.decode(encode_desired(DesiredMessage(4, {"a": 1}, {"a": 1})))
    assert desired == {"version": 4, "desired": {"a": 1}, "delta": {"a": 1}}
    event = StateEvent("dev-1", {"a": 1}, {"a": 1}, {}, 5)
    frame = msgspec.json.decode(encode_event(event))
    assert frame == {
        "type": "state",
        "device_id": "dev-1",
        "desired": {"a": 1},
        "reported": {"a": 1},
        "delta": {},
        "version": 5,
    }
    assert decode_event(encode_event(event)) == event


def test_if_match_names_a_version() -> None:
    from iot_api.errors import Invalid
    from iot_api.services.state import etag, parse_if_match

    assert parse_if_match(None) is None
    assert parse_if_match("*") is None
    assert parse_if_match('"7"') == 7
    assert parse_if_match('W/"7"') == 7
    assert parse_if_match(etag(12)) == 12
    for bad in ("7", '"x"', '"-1"', '"1", "2"', '"' + "9" * 19 + '"'):
        with pytest.raises(Invalid):
            parse_if_match(bad)
