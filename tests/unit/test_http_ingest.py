"""HTTP device ingest, its pure parts: credentials, the credential cache, bodies, answers, outcomes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from iot_common.messages import METRIC_NAME_PATTERN, Reading
from iot_ingest.batcher import Batcher
from iot_ingest.consumer import DeviceQuota
from iot_ingest.device_auth import BadAuthorization, DeviceAuth, Presented, hash_secret, parse_authorization
from iot_ingest.devices import TenantLimits
from iot_ingest.http_ingest import HttpIngest, Refused, Rejected, decode_body, rejected_items
from iot_ingest.payload import Limits, Reject, parse_telemetry
from iot_ingest.plan import Delivery, Outcome, Refusal, plan_batch
from iot_ingest.tenant_quota import admit
from iot_testkit.waiting import wait_for

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
TENANT = "00000000-0000-0000-0000-00000000000a"


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def test_basic_and_bearer_credentials_are_parsed() -> None:
    assert parse_authorization(basic("boiler-1:iotd_secret")) == Presented("boiler-1", "iotd_secret")
    assert parse_authorization(basic("boiler-1:with:colons")) == Presented("boiler-1", "with:colons")
    assert parse_authorization("bearer  iotd_secret ") == Presented(None, "iotd_secret")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Basic",
        "Basic !!!",
        basic("no-colon"),
        basic(":secret"),
        basic("device:"),
        "Bearer ",
        "Bearer " + "x" * 513,
        "Digest abc",
        "Basic " + base64.b64encode(b"\xff\xfe:x").decode(),
    ],
)
def test_malformed_credentials_are_refused(header: str | None) -> None:
    with pytest.raises(BadAuthorization):
        parse_authorization(header)


class Credentials:
    """The rows the credential look-up would find, and how often it was asked."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, bool]] = {}
        self.asked = 0

    async def lookup(self, device_id: str) -> tuple[str, bool] | None:
        self.asked += 1
        return self.rows.get(device_id)


async def test_a_secret_is_checked_against_its_hash_and_revocation_is_honoured_after_the_ttl() -> None:
    now = [0.0]
    creds = Credentials()
    creds.rows["a"] = (hash_secret("right"), True)
    auth = DeviceAuth(creds.lookup, ttl_s=10, clock=lambda: now[0])
    assert await auth.verify("a", "right")
    assert not await auth.verify("a", "wrong")
    assert not await auth.verify("ghost", "right")
    assert not await auth.verify("ghost", "")
    assert creds.asked == 2  # one look-up per device within the TTL, unknown devices included
    creds.rows["a"] = (hash_secret("right"), False)  # revoked
    now[0] = 9.9
    assert await auth.verify("a", "right"), "cached until the TTL"
    now[0] = 10.1
    assert not await auth.verify("a", "right")
    creds.rows["a"] = (hash_secret("rotated"), True)
    now[0] = 20.2
    assert not await auth.verify("a", "right")
    assert await auth.verify("a", "rotated")


async def test_the_credential_cache_is_bounded_and_ttl_0_asks_every_time() -> None:
    creds = Credentials()
    auth = DeviceAuth(creds.lookup, ttl_s=60, max_entries=3)
    for i in range(10):
        await auth.verify(f"d{i}", "x")
    assert len(auth) == 3
    uncached = DeviceAuth(creds.lookup, ttl_s=0)
    before = creds.asked
    await uncached.verify("d1", "x")
    await uncached.verify("d1", "x")
    assert creds.asked == before + 2
    assert len(uncached) == 0


def test_bodies_are_gunzipped_within_the_limit() -> None:
    body = b'{"t": 1}'
    assert decode_body(body, "", 100) == body
    assert decode_body(body, "identity", 100) == body
    assert decode_body(gzip.compress(body), "gzip", 100) == body
    bomb = gzip.compress(b" " * 10_000_000)
    assert len(bomb) < 20_000
    with pytest.raises(Refused) as err:
        decode_body(bomb, "gzip", 1_000_000)
    assert err.value.status == 413


@pytest.mark.parametrize(
    ("raw", "encoding", "status"),
    [
        pytest.param(b"not gzip", "gzip", 400, id="not-gzip"),
        pytest.param(gzip.compress(b'{"t": 1}')[:-6], "gzip", 400, id="truncated-gzip"),
        pytest.param(gzip.compress(b'{"t": 1}') + gzip.compress(b"{}"), "gzip", 400, id="two-gzip-members"),
        pytest.param(b'{"t": 1}', "br", 415, id="br"),
        pytest.param(b'{"t": 1}', "deflate", 415, id="deflate"),
    ],
)
def test_bad_encodings_are_refused_with_a_4xx(raw: bytes, encoding: str, status: int) -> None:
    with pytest.raises(Refused) as err:
        decode_body(raw, encoding, 1000)
    assert err.value.status == status


def test_rejected_items_name_the_index_of_each_refused_reading() -> None:
    parsed = parse_telemetry("a", b'[{"t": 1}, {"9x": 1}, {"t": "x" }, 5]', T0, Limits(max_text_length=0))
    assert len(parsed.readings) == 1
    assert rejected_items(parsed.rejects, parsed.indices) == [
        Rejected(1, "invalid_metric_name", f"'9x' does not match {METRIC_NAME_PATTERN}"),
        Rejected(2, "text_too_long", "t: 1 characters, limit 0"),
        Rejected(3, "invalid_shape", "expected an object, got number"),
    ]
    single = parse_telemetry("a", b'{"ts": "yesterday", "t": 1}', T0, Limits())
    assert [(r.index, r.reason) for r in rejected_items(single.rejects, single.indices)] == [
        (0, "invalid_timestamp")
    ]
    whole = parse_telemetry("a", b"[" + b"{}," * 3 + b"{}]", T0, Limits(max_readings=3))
    assert [(r.index, r.reason) for r in rejected_items(whole.rejects, whole.indices)] == [
        (None, "too_many_readings")
    ]


def test_outcomes_are_filled_only_when_the_plan_is_settled() -> None:
    stored, unknown, over = Outcome(), Outcome(), Outcome()
    one = [Reading("a", T0, {"t": 1.0}), Reading("a", T0, {"t": 2.0})]
    batch = [
        Delivery("/p/a", "a", T0, b"[]", one, [Reject("invalid_value", "[2] t: x")], outcome=stored),
        Delivery("/p/b", "b", T0, b"{}", [Reading("b", T0, {"t": 1.0})], outcome=unknown),
        Delivery("/p/c", "c", T0, b"{}", [Reading("c", T0, {"t": 1.0})] * 5, outcome=over),
    ]
    limits = {TENANT: TenantLimits("acme", max_readings_per_s=3)}
    tenants = {"a": TENANT, "c": TENANT}
    admitted = admit(batch, tenants, limits, {TENANT: 0})
    assert admitted[2].outcome is over
    refused = {"b": Refusal("unknown_device", "device 'b' is not registered")}
    plan = plan_batch(admitted, refused, tenants)
    assert (stored.stored, unknown.refusal, over.refusal) == (0, None, None), "not before the commit"
    plan.settle()
    assert (stored.stored, stored.refusal) == (2, None)
    assert (unknown.stored, unknown.refusal) == (0, Reject("unknown_device", "device 'b' is not registered"))
    assert over.stored == 0
    assert over.refusal is not None
    assert over.refusal.reason == "tenant_quota"
    assert [r.device_id for r in plan.readings] == ["a", "a"]


class Edge:
    """The HTTP routes on a real aiohttp server, feeding a real batcher whose flush the test controls."""

    def __init__(
        self,
        *,
        max_concurrent: int = 8,
        timeout_s: float = 5.0,
        quota: DeviceQuota | None = None,
        max_body_bytes: int = 4096,
    ) -> None:
        self.release = asyncio.Event()
        self.failing = False
        self.flushed: list[Delivery] = []
        creds = Credentials()
        creds.rows = {"a": (hash_secret("sa"), True), "b": (hash_secret("sb"), True)}
        self.batcher: Batcher[Delivery] = Batcher(self._flush, max_size=100, max_delay=0)
        self.http = HttpIngest(
            auth=DeviceAuth(creds.lookup, ttl_s=60),
            batcher=self.batcher,
            limits=Limits(),
            quota=quota,
            storage_failing=lambda: self.failing,
            accepting=lambda: True,
            timeout_s=timeout_s,
            max_concurrent=max_concurrent,
            max_body_bytes=max_body_bytes,
            max_readings=100,
        )

    async def _flush(self, batch: list[Delivery]) -> None:
        await self.release.wait()
        for delivery in batch:
            assert delivery.outcome is not None
            delivery.outcome.stored = len(delivery.readings)
        self.flushed += batch

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[TestClient[web.Request, web.Application]]:
        app = web.Application(middlewares=[self.http.problems])
        app.add_routes(self.http.routes())
        self.batcher.start()
        async with TestClient(TestServer(app)) as client:
            yield client
        self.release.set()
        await self.batcher.close()


def auth(device: str, secret: str) -> dict[str, str]:
    return {"Authorization": basic(f"{device}:{secret}")}


PATH = "/ingest/v1/devices/a/telemetry"


async def test_the_answer_waits_for_the_commit_and_is_503_past_the_deadline() -> None:
    edge = Edge(timeout_s=0.3)
    async with edge.client() as client:
        late = await client.post(PATH, json={"t": 1}, headers=auth("a", "sa"))
        assert late.status == 503
        assert late.headers["Retry-After"] == "5"
        assert late.content_type == "application/problem+json"
        edge.release.set()
        ok = await client.post(PATH, json=[{"t": 1}, {"t": "x" * 100}], headers=auth("a", "sa"))
        assert ok.status == 200
        assert await ok.json() == {
            "stored": 1,
            "rejected": [{"index": 1, "reason": "text_too_long", "detail": "t: 100 characters, limit 64"}],
        }
    # The request answered 503 was still committed later: posting it again is a no-op by primary key.
    assert len(edge.flushed) == 2


async def test_storage_failing_or_too_many_requests_are_503_at_once() -> None:
    edge = Edge(max_concurrent=1)
    async with edge.client() as client:
        edge.failing = True
        down = await client.post(PATH, json={"t": 1}, headers=auth("a", "sa"))
        assert (down.status, down.headers["Retry-After"]) == (503, "5")
        edge.failing = False
        waiting = asyncio.ensure_future(client.post(PATH, json={"t": 1}, headers=auth("a", "sa")))
        await wait_for(lambda: _true(edge.http.active == 1), 5, "one request in")
        busy = await client.post(PATH, json={"t": 2}, headers=auth("a", "sa"))
        assert (busy.status, busy.headers["Retry-After"]) == (503, "1")
        edge.release.set()
        assert (await waiting).status == 200
    assert len(edge.flushed) == 1


async def test_credentials_limits_and_media_types_are_4xx() -> None:
    quota = DeviceQuota(rate=10, burst=20)
    edge = Edge(quota=quota)
    edge.release.set()
    async with edge.client() as client:
        assert (await client.post(PATH, json={"t": 1})).status == 401
        assert (await client.post(PATH, json={"t": 1}, headers=auth("a", "sb"))).status == 401
        assert (await client.post(PATH, json={"t": 1}, headers=auth("b", "sb"))).status == 403
        bearer = {"Authorization": "Bearer sa"}
        assert (await client.post(PATH, json={"t": 1}, headers=bearer)).status == 200
        too_big = await client.post(
            PATH,
            data=b"[" + b" " * 5000 + b"]",
            headers={**auth("a", "sa"), "Content-Type": "application/json"},
        )
        assert too_big.status == 413
        text = await client.post(
            PATH, data=b'{"t": 1}', headers={**auth("a", "sa"), "Content-Type": "text/plain"}
        )
        assert text.status == 415
        bad_id = await client.post("/ingest/v1/devices/-x/telemetry", json={"t": 1}, headers=auth("a", "sa"))
        assert bad_id.status == 404
        # The device quota (shared with MQTT): 20 readings at once, then 429 with a wait.
        full = await client.post(PATH, json=[{"t": i} for i in range(19)], headers=auth("a", "sa"))
        assert full.status == 200
        over = await client.post(PATH, json=[{"t": i} for i in range(5)], headers=auth("a", "sa"))
        assert over.status == 429
        assert over.headers["Retry-After"] == "1"
        assert (await over.json())["reason"] == "rate_limited"
        assert edge.http.max_readings == 20, "capped at the bucket"


async def _true(value: bool) -> bool:
    return value


async def test_a_parser_failure_is_a_dead_letter_and_a_422_not_a_5xx(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("parser bug")

    monkeypatch.setattr("iot_ingest.http_ingest.parse_telemetry", broken)
    edge = Edge()
    edge.release.set()
    async with edge.client() as client:
        answer = await client.post(PATH, json={"t": 1}, headers=auth("a", "sa"))
        assert answer.status == 422
        problem = await answer.json()
        assert problem["rejected"] == [
            {"index": None, "reason": "handler_error", "detail": "RuntimeError: parser bug"}
        ]
    assert [d.rejects[0].reason for d in edge.flushed] == ["handler_error"]


async def test_bodies_above_aiohttp_s_default_size_are_read_up_to_the_setting() -> None:
    edge = Edge(max_body_bytes=4 * 1024 * 1024)
    edge.release.set()
    body = b'[{"t": 1}' + b" " * (3 * 1024 * 1024) + b"]"
    async with edge.client() as client:
        headers = {**auth("a", "sa"), "Content-Type": "application/json"}
        answer = await client.post(PATH, data=body, headers=headers)
        assert answer.status == 200, await answer.text()
        assert await answer.json() == {"stored": 1, "rejected": []}
        too_big = await client.post(PATH, data=body + b" " * (2 * 1024 * 1024), headers=headers)
        assert too_big.status == 413
