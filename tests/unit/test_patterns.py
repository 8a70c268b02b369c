"""Every validation pattern is matched in full: a valid value followed by a newline is refused.

Python's ``$`` also matches before a trailing newline, so ``^x$`` accepts ``"x\\n"``; msgspec's
``Meta(pattern=)`` and ``re.match`` use these semantics. The patterns end with ``(?!\\n)$`` instead of
``\\Z``, because the OpenAPI document shows them to clients, where ECMA-262 reads ``\\Z`` as a literal ``Z``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iot_api.app import create_app
from iot_api.settings import ApiSettings
from iot_common import alerts, messages, topics
from iot_common.auth import generate_api_key
from iot_ingest.payload import _METRIC_RE
from iot_ingest.settings import IngestSettings
from iot_realtime.protocol import ClientFrame
from iot_realtime.settings import RealtimeSettings

# Free text: newlines are allowed anywhere in these, so a trailing one is no surprise.
FREE_TEXT = {r"^[^\x00]*$"}


def _patterns(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                yield value
            else:
                yield from _patterns(value)
    elif isinstance(node, list | tuple):
        for item in node:
            yield from _patterns(item)


def _all_patterns() -> list[str]:
    found: set[str] = {topics.DEVICE_ID_PATTERN, messages.METRIC_NAME_PATTERN, _METRIC_RE.pattern}
    schemas = msgspec.json.schema_components(
        [
            ApiSettings,
            IngestSettings,
            RealtimeSettings,
            ClientFrame,
            alerts.WebhookAction,
            alerts.CommandAction,
            messages.Reading,
        ]
    )
    found.update(_patterns(schemas))
    app = create_app(
        ApiSettings(bootstrap_api_key=generate_api_key()[0], jwt_secret=secrets.token_urlsafe(48))
    )
    found.update(_patterns(app.openapi_schema.to_schema()))
    return sorted(found - FREE_TEXT)


PATTERNS = _all_patterns()


def test_the_sweep_sees_the_shared_patterns() -> None:
    assert topics.DEVICE_ID_PATTERN in PATTERNS
    assert messages.METRIC_NAME_PATTERN in PATTERNS
    assert len(PATTERNS) >= 15


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_trailing_newline_never_matches(pattern: str) -> None:
    compiled = re.compile(pattern)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.from_regex(compiled))
    def check(value: str) -> None:
        if "\n" in value:  # the generator adds text around a match; keep only clean matches
            return
        assert compiled.search(value + "\n") is None, f"{pattern!r} accepts {value + chr(10)!r}"

    check()


@pytest.mark.parametrize(
    ("check", "value"),
    [
        (topics.is_valid_device_id, "x\n"),
        (lambda v: _METRIC_RE.match(v) is not None, "tnl\n"),
        (lambda v: re.search(messages.METRIC_NAME_PATTERN, v) is not None, "tnl\n"),
    ],
)
def test_shared_validators_refuse_a_trailing_newline(check: Any, value: str) -> None:
    assert not check(value)


def test_realtime_refuses_a_star_with_a_newline() -> None:
    from iot_realtime.protocol import FrameError, decode_client_frame

    with pytest.raises(FrameError):
        decode_client_frame(b'{"type":"subscribe","devices":["*\\n"]}', 1024)


def test_ingest_dead_letters_a_metric_name_with_a_newline() -> None:
    from datetime import UTC, datetime

    from iot_ingest.payload import Limits, parse_telemetry

    parsed = parse_telemetry("dev-1", b'{"tnl\\n": 1, "ok": 2}', datetime.now(UTC), Limits())
    assert parsed.readings == []
    assert [r.reason for r in parsed.rejects] == ["invalid_metric_name"]
