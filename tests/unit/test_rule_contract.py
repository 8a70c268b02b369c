"""The alert-rule contract between the API and ingest: one table of rule bodies and actions, run through the
API's validation (its Litestar body decoding and the rule service's checks) and through ingest's rule
loading (``rule_from_record``, which keeps a rule's action only when ``parse_action`` accepts it).

- An action is accepted by both or refused by both; what the API stores loads in ingest unchanged.
- A rule the API accepts loads in ingest with the same condition. Ingest checks nothing else of a rule row:
  the API is the only writer of ``alert_rules``, and the table's CHECKs refuse the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from litestar import Litestar, post
from litestar.params import JSONBody
from litestar.testing import TestClient

from iot_api.problems import EXCEPTION_HANDLERS
from iot_api.schemas.alerts import AlertRuleCreate
from iot_api.services.alerts import new_rule_columns
from iot_ingest.alerts import rule_from_record
from iot_ingest.rules import Rule

RULE = {"name": "hot", "metric": "temperature", "op": ">", "threshold": 30.0, "device_type": "thermo"}
URL = "https://hooks.example.com/iot"

VALID_ACTIONS: list[dict[str, Any]] = [
    {"type": "command", "name": "fan_on"},
    {
        "type": "command",
        "name": "set.level:2",
        "params": {"speed": 3, "steps": [1, "a", None], "nested": {"on": True}},
        "expires_s": 60,
        "on": ["open", "resolve"],
    },
    {"type": "command", "name": "_x", "expires_s": 604800, "on": ["resolve"]},
    {"type": "command", "name": "x", "expires_s": "60"},  # a number in a string, as for any body field
    {"type": "command", "name": "a" * 64},
    {"type": "webhook", "url": URL},
    {"type": "webhook", "url": "http://10.0.0.1:8080/a?b=c#d", "headers": {}, "on": ["open", "resolve"]},
    {"type": "webhook", "url": URL, "headers": {"Authorization": "Bearer t", "X-" + "a" * 98: "v" * 2000}},
    {"type": "webhook", "url": URL, "headers": {f"X-{i}": "v" for i in range(50)}},
    {"type": "webhook", "url": "https://h/" + "a" * 2038},
]

INVALID_ACTIONS: list[dict[str, Any]] = [
    {"type": "email", "to": "a@b"},
    {"name": "x"},
    {"type": "command"},
    {"type": "command", "name": "1x"},
    {"type": "command", "name": "a" * 65},
    {"type": "command", "name": "x y"},
    {"type": "command", "name": "x", "expires_s": 0},
    {"type": "command", "name": "x", "expires_s": 604801},
    {"type": "command", "name": "x", "on": []},
    {"type": "command", "name": "x", "on": ["ack"]},
    {"type": "command", "name": "x", "on": ["open", "resolve", "open"]},
    {"type": "command", "name": "x", "params": {"a": "\x00"}},
    {"type": "command", "name": "x", "params": {"a\x00": 1}},
    {"type": "command", "name": "x", "extra": 1},
    {"type": "webhook"},
    {"type": "webhook", "url": "ftp://x"},
    {"type": "webhook", "url": "https://user:pw@hooks.example.com/x"},
    {"type": "webhook", "url": "https://h/x y"},
    {"type": "webhook", "url": "https://h/" + "a" * 2039},
    {"type": "webhook", "url": URL, "headers": {"bad header": "v"}},
    {"type": "webhook", "url": URL, "headers": {"X-" + "a" * 99: "v"}},  # a 101-character name
    {"type": "webhook", "url": URL, "headers": {"X": "v" * 2001}},
    {"type": "webhook", "url": URL, "headers": {"X": "a\nb"}},
    {"type": "webhook", "url": URL, "headers": {f"X-{i}": "v" for i in range(51)}},
    {"type": "webhook", "url": URL, "on": "open"},
    {"type": "webhook", "url": URL, "extra": 1},
]

VALID_RULES: list[dict[str, Any]] = [
    RULE,
    {
        "name": "n" * 200,
        "metric": "boiler.temp-1",
        "op": "<=",
        "threshold": -1e300,
        "device_id": "sensor-001",
        "for_seconds": 604800,
        "hysteresis": 0.5,
        "severity": "critical",
        "message": "m" * 1000,
        "enabled": False,
    },
    {**RULE, "op": "!=", "threshold": "30"},
    {**RULE, "op": "==", "device_type": "a:b.c_d-e"},
]

INVALID_RULES: list[dict[str, Any]] = [
    {key: value for key, value in RULE.items() if key != "device_type"},
    {**RULE, "device_id": "sensor-001"},
    {**RULE, "name": ""},
    {**RULE, "name": "n" * 201},
    {**RULE, "name": "a\x00b"},
    {**RULE, "metric": "1x"},
    {**RULE, "op": "=>"},
    {**RULE, "threshold": 1e301},
    {**RULE, "device_type": "a b"},
    {**RULE, "device_type": None, "device_id": "-x"},
    {**RULE, "for_seconds": -1},
    {**RULE, "for_seconds": 604801},
    {**RULE, "hysteresis": -1},
    {**RULE, "severity": "fatal"},
    {**RULE, "message": "m" * 1001},
    {**RULE, "bogus": 1},
]


@post("/rules", status_code=200)
async def validate(data: JSONBody[AlertRuleCreate]) -> dict[str, Any]:
    """The API's validation of a new rule: its body type and the rule service's checks."""
    return new_rule_columns(data)


@pytest.fixture(scope="module")
def api() -> Iterator[TestClient[Litestar]]:
    with TestClient(Litestar([validate], exception_handlers=EXCEPTION_HANDLERS)) as client:
        yield client


def api_columns(api: TestClient[Litestar], body: dict[str, Any]) -> dict[str, Any] | None:
    """The columns the API would store for ``body`` (as jsonb gives them back), None when it refuses."""
    response = api.post(
        "/rules", content=msgspec.json.encode(body), headers={"content-type": "application/json"}
    )
    assert response.status_code in (200, 400, 422), response.text
    return response.json() if response.status_code == 200 else None


TENANT = "00000000-0000-0000-0000-000000000001"


def ingest_rule(columns: dict[str, Any]) -> Rule:
    """The rule ingest loads from a row of ``alert_rules`` with these columns."""
    return rule_from_record({"id": "r-1", "tenant_id": TENANT, **columns})


@pytest.mark.parametrize("action", VALID_ACTIONS)
def test_an_action_the_api_accepts_loads_in_ingest_unchanged(
    api: TestClient[Litestar], action: dict[str, Any]
) -> None:
    columns = api_columns(api, {**RULE, "action": action})
    assert columns is not None, action
    stored = columns["action"]
    assert ingest_rule(columns).action == stored
    assert ingest_rule({**columns, "action": action}).action == action  # also as the client wrote it


@pytest.mark.parametrize("action", INVALID_ACTIONS)
def test_an_action_the_api_refuses_is_refused_by_ingest(
    api: TestClient[Litestar], action: dict[str, Any]
) -> None:
    assert api_columns(api, {**RULE, "action": action}) is None
    row = {
        **RULE,
        "for_seconds": 0,
        "hysteresis": 0.0,
        "severity": "warning",
        "message": "",
        "device_id": None,
    }
    assert ingest_rule({**row, "action": action}).action is None


@pytest.mark.parametrize("body", VALID_RULES)
def test_a_rule_the_api_accepts_loads_in_ingest_with_the_same_condition(
    api: TestClient[Litestar], body: dict[str, Any]
) -> None:
    columns = api_columns(api, body)
    assert columns is not None, body
    rule = ingest_rule(columns)
    given = msgspec.convert(body, AlertRuleCreate, strict=False)
    assert rule == Rule(
        id="r-1",
        tenant_id=TENANT,
        metric=given.metric,
        op=given.op,
        threshold=given.threshold,
        device_id=given.device_id,
        device_type=given.device_type,
        for_seconds=given.for_seconds,
        hysteresis=given.hysteresis,
        severity=given.severity,
        message=given.message,
        action=None,
    )
    assert columns["enabled"] == given.enabled
    assert columns["name"] == given.name


@pytest.mark.parametrize("body", INVALID_RULES)
def test_a_rule_outside_the_contract_is_refused_by_the_api(
    api: TestClient[Litestar], body: dict[str, Any]
) -> None:
    assert api_columns(api, body) is None
