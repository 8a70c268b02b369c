"""Hostile input gets a 4xx naming what is wrong, never a 500: forged cursors, deep JSON, trailing newlines,
NUL bytes, out-of-range numbers; plus a sweep of every route with such values."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from litestar import Request
from litestar.testing import AsyncTestClient

from iot_api.app import create_app
from iot_api.pagination import encode_cursor
from iot_api.problems import problem_response
from iot_api.services.telemetry import _fingerprint
from iot_api.settings import ApiSettings
from iot_common.auth import generate_api_key
from iot_testkit.processes import JWT_SECRET
from tests.integration.api.conftest import ClientFactory
from tests.integration.api.test_devices import assert_problem
from tests.integration.api.test_telemetry import HOUR0, make_device, seed

Client = AsyncTestClient[Any]
DEEP = "[" * 3000 + "]" * 3000
HISTORY = "/api/v1/telemetry/history"


def forged(json_text: str) -> str:
    return base64.urlsafe_b64encode(json_text.encode()).decode().rstrip("=")


NUL_TEXT_CURSOR = forged('["2026-01-01T00:00:00Z","temp\\u0000"]')
INT_OVERFLOW_CURSOR = forged('["2026-01-01T00:00:00Z",9223372036854775808]')
NUL_ID_CURSOR = forged('["dev\\u0000"]')
DEEP_CURSOR = forged(DEEP)


async def test_forged_cursors_are_refused_naming_the_cursor(
    client: Client, writer: dict[str, str], unique: str, database_url: str
) -> None:
    device_id = f"c-{unique}"
    await make_device(client, writer, device_id)
    await seed(database_url, device_id, 60)  # data, so that the query runs with the cursor's position
    cases = [
        (f"/api/v1/devices/{device_id}/telemetry", NUL_TEXT_CURSOR),
        ("/api/v1/ingest/rejects", INT_OVERFLOW_CURSOR),
        ("/api/v1/devices", NUL_ID_CURSOR),
        ("/api/v1/devices", DEEP_CURSOR),
        ("/api/v1/alerts", DEEP_CURSOR),
    ]
    for path, cursor in cases:
        assert_problem(await client.get(path, params={"cursor": cursor}, headers=writer), 422, "cursor")


async def test_a_history_cursor_with_a_crafted_range_is_a_422_naming_the_cursor(
    client: Client, writer: dict[str, str], reader: dict[str, str], unique: str, database_url: str
) -> None:
    device_id = f"hc-{unique}"
    await make_device(client, writer, device_id)
    await seed(database_url, device_id, 60)

    def crafted(bucket: str | None, start: datetime, end: datetime, after: datetime | None) -> str:
        # Built as the API builds a history cursor: the query's fingerprint (devices, metric, bucket, limit),
        # the device's index, the range, the last point and the count of points already sent.
        return encode_cursor(_fingerprint([device_id], "temp", bucket, 1000), 0, start, end, after, 0)

    async def history(bucket: str | None, cursor: str) -> Any:
        params = [("device_id", device_id), ("metric", "temp"), ("cursor", cursor)]
        return await client.get(
            HISTORY, params=params + ([("bucket", bucket)] if bucket else []), headers=reader
        )

    # Such a cursor is taken when its content is sane, so those below are refused for their content.
    sane = await history("1m", crafted("1m", HOUR0, HOUR0 + timedelta(hours=1), HOUR0 + timedelta(minutes=1)))
    assert sane.status_code == 200, sane.text
    assert [len(s["points"]) for s in sane.json()["series"]] == [0]  # the seed is within the first minute
    # A time without zone at one end of the range (naive and aware times do not compare) is read as UTC,
    # as in `from` and `to`.
    day = datetime(2026, 1, 1, tzinfo=UTC)
    for bucket, after in (("1h", None), (None, datetime(2026, 1, 1, 1))):
        naive = await history(
            bucket, crafted(bucket, day.replace(tzinfo=None), day + timedelta(days=1), after)
        )
        assert naive.status_code == 200, naive.text
        assert (naive.json()["from"], naive.json()["to"]) == ("2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z")
    far = datetime(9999, 1, 1, tzinfo=UTC)
    year_end = datetime(9999, 12, 31, tzinfo=UTC)
    cases = [
        # The next bucket after the last one is past the largest date Python has.
        ("7d", crafted("7d", far, year_end, datetime(9999, 12, 30, tzinfo=UTC))),
        # A zone offset that moves the time past the largest date once in UTC.
        (None, crafted(None, HOUR0, datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5))), None)),
        # A range backwards, and a last point outside the range.
        ("1h", crafted("1h", HOUR0 + timedelta(hours=1), HOUR0, None)),
        (None, crafted(None, HOUR0, HOUR0 + timedelta(hours=1), HOUR0 + timedelta(hours=2))),
        (None, crafted(None, HOUR0, HOUR0 + timedelta(hours=1), HOUR0 - timedelta(hours=2))),
    ]
    for bucket, cursor in cases:
        assert_problem(await history(bucket, cursor), 422, "cursor")


async def test_deep_json_is_a_400_also_on_the_login(client: Client, writer: dict[str, str]) -> None:
    json_headers = {"Content-Type": "application/json"}
    body = assert_problem(await client.post("/api/v1/auth/login", content=DEEP, headers=json_headers), 400)
    assert "deep" in body["detail"]
    deep_field = '{"id": "d1", "attributes": {"a": ' + DEEP + "}}"
    response = await client.post("/api/v1/devices", content=deep_field, headers={**writer, **json_headers})
    assert_problem(response, 400)


async def test_a_device_id_with_a_trailing_newline_is_refused_naming_the_field(
    client: Client, writer: dict[str, str]
) -> None:
    assert_problem(await client.post("/api/v1/devices", json={"id": "x\n"}, headers=writer), 422, "id")
    response = await client.get("/api/v1/telemetry/latest", params={"device_id": "x\n"}, headers=writer)
    assert_problem(response, 422, "device_id")
    response = await client.get(
        "/api/v1/telemetry/history", params={"device_id": "x", "metric": "tnl\n"}, headers=writer
    )
    assert_problem(response, 422, "metric")


async def test_a_nul_in_a_dashboard_path_is_a_404(make_client: ClientFactory, tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><title>dashboard</title>")
    client = await make_client(dashboard_dir=str(tmp_path))
    assert (await client.get("/dashboard/")).status_code == 200
    assert_problem(await client.get("/dashboard/%00"), 404)
    assert_problem(await client.get("/dashboard/index.html%00.js"), 404)


async def test_a_dashboard_path_the_os_cannot_resolve_is_a_404(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><title>dashboard</title>")
    client = await make_client(dashboard_dir=str(tmp_path))
    assert (await client.get("/dashboard/index.html")).status_code == 200
    # A file taken for a folder (ENOTDIR) and a name longer than the file system allows (ENAMETOOLONG).
    assert_problem(await client.get("/dashboard/index.html/x"), 404)
    assert_problem(await client.get("/dashboard/" + "a" * 300), 404)
    assert_problem(await client.get("/dashboard/" + "/".join(["a" * 200] * 30)), 404)


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (RecursionError("maximum recursion depth exceeded"), 400),
        (asyncpg.CharacterNotInRepertoireError('invalid byte sequence for encoding "UTF8": 0x00'), 400),
        (asyncpg.DataError("invalid input for query argument $1 (value out of int64 range)"), 400),
        (asyncpg.CheckViolationError("new row violates check constraint"), 400),
        (RuntimeError("a bug"), 500),
    ],
)
def test_recursion_and_database_data_errors_are_client_errors(exc: Exception, status: int) -> None:
    request: Request[Any, Any, Any] = Request(
        {"type": "http", "method": "GET", "path": "/x", "headers": [], "query_string": b"", "state": {}}  # type: ignore[typeddict-item]
    )
    response = problem_response(request, exc)
    assert response.status_code == status


# The sweep: every operation of the OpenAPI document with hostile values in each path and query
# parameter, and hostile bodies; the answer is never a 5xx.

HOSTILE_VALUES = [
    "x\n",
    "\x00",
    "a\x00b",
    "9223372036854775808",
    "-9223372036854775809",
    "1e309",
    "NaN",
    "9999-12-31T23:59:59+14:00",
    "0000-01-01",
    "'; SELECT 1; --",
    "%",
    "\u202e\U0001f600",
    "z" * 5000,
    NUL_TEXT_CURSOR,
    INT_OVERFLOW_CURSOR,
    NUL_ID_CURSOR,
    DEEP_CURSOR,
]
HOSTILE_BODIES = [
    DEEP,
    '{"a":' * 3000 + "1" + "}" * 3000,
    '{"id": "x\\n", "name": "x\\n", "type": "x\\n", "metric": "tnl\\n", "email": "a\\n", "password": "p"}',
    '{"id": "a\\u0000", "name": "\\u0000", "refresh_token": "\\u0000", "scopes": ["\\u0000"]}',
    '{"id": 1e400, "limit": 9223372036854775808, "threshold": 1e309}',
    '"\\ud800"',
]
HOSTILE_BYTES = [body.encode() for body in HOSTILE_BODIES] + [b'{"id": "\xff\xfe"}']


def _operations() -> list[tuple[str, str, list[tuple[str, str]], bool]]:
    settings = ApiSettings(bootstrap_api_key=generate_api_key()[0], jwt_secret=JWT_SECRET)
    schema = create_app(settings).openapi_schema.to_schema()
    operations = []
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            params = [(p["name"], p["in"]) for p in op.get("parameters", []) if p["in"] in ("path", "query")]
            operations.append((method.upper(), path, params, "requestBody" in op))
    return operations


OPERATIONS = _operations()
_PATH_PARAM = re.compile(r"\{(\w+)\}")


def _fill(path: str, value: str | None = None) -> str:
    from urllib.parse import quote

    return _PATH_PARAM.sub(lambda m: quote(value, safe="") if value is not None else "x", path)


async def test_the_sweep_covers_the_api() -> None:
    assert len(OPERATIONS) >= 30
    assert any(params for _, _, params, _ in OPERATIONS)


@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=lambda v: repr(v)[:24])
async def test_no_route_answers_a_hostile_parameter_with_a_5xx(
    make_client: ClientFactory, value: str
) -> None:
    client = await make_client(api_rate_limit_per_minute=0)
    admin = {"X-API-Key": client.app.state.settings.bootstrap_api_key}
    failures = []
    for method, path, params, has_body in OPERATIONS:
        requests: list[tuple[str, dict[str, Any]]] = []
        if "{" in path:
            requests.append((_fill(path, value), {}))
        for name, where in params:
            if where == "query":
                requests.append((_fill(path), {"params": {name: value}}))
        for url, extra in requests:
            if has_body:
                extra = {**extra, "json": {}}
            response = await client.request(method, url, headers=admin, **extra)
            if response.status_code >= 500:
                failures.append(f"{method} {url} {extra}: {response.status_code}")
    assert not failures, failures


@pytest.mark.parametrize("body", HOSTILE_BYTES, ids=lambda v: repr(v)[:24])
async def test_no_route_answers_a_hostile_body_with_a_5xx(make_client: ClientFactory, body: bytes) -> None:
    client = await make_client(api_rate_limit_per_minute=0)
    admin = {"X-API-Key": client.app.state.settings.bootstrap_api_key, "Content-Type": "application/json"}
    failures = []
    for method, path, _, has_body in OPERATIONS:
        if not has_body:
            continue
        for headers in (admin, {"Content-Type": "application/json"}):
            response = await client.request(method, _fill(path), content=body, headers=headers)
            if response.status_code >= 500:
                failures.append(f"{method} {path}: {response.status_code} {response.text[:120]}")
    assert not failures, failures


async def test_the_dashboard_address_without_a_slash_redirects_so_its_assets_load(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    """``/dashboard`` (what a user types) would load ``app.js`` from ``/app.js``: it redirects instead."""
    (tmp_path / "index.html").write_text('<!doctype html><script src="app.js"></script>')
    client = await make_client(dashboard_dir=str(tmp_path))
    for path, location in (
        ("/dashboard", "/dashboard/"),
        ("/dashboard?ws=ws://h/ws", "/dashboard/?ws=ws://h/ws"),
    ):
        response = await client.get(path, follow_redirects=False)
        assert (response.status_code, response.headers["location"]) == (308, location)
        assert "content-security-policy" in response.headers
    assert (await client.get("/dashboard", follow_redirects=True)).status_code == 200


def test_no_dashboard_form_can_put_a_password_in_a_url() -> None:
    """Without its script (blocked, or still loading) a form submits natively: a GET would put the
    password into the URL and the browser history, so every form posts."""
    page = (Path(__file__).resolve().parents[3] / "dashboard" / "src" / "index.html").read_text()
    forms = re.findall(r"<form\b[^>]*>", page)
    assert forms
    for form in forms:
        assert re.search(r'\bmethod="post"', form), form
