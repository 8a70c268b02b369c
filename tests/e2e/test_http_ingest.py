"""HTTP device ingest end to end: ``iot-api`` issues a device's credential, the device posts readings to
``iot-ingest``'s HTTP port, and the readings go the way MQTT ones go (database, latest values, WebSocket,
alert rules). Services as processes, a private Mosquitto, a private Redis prefix and database per test.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from iot_testkit.chaos import TcpProxy
from iot_testkit.metrics import scrape
from iot_testkit.processes import ServiceProcess, Start, free_port, mosquitto
from iot_testkit.waiting import wait_for
from tests.e2e.realtime_support import open_ws, recv_json, start_realtime, subscribe, token

BOOTSTRAP_KEY = "iotk_httpingest01_" + "h" * 24


@pytest.fixture
def broker() -> Iterator[str]:
    with mosquitto() as url:
        yield url


@dataclass
class Platform:
    api: httpx.AsyncClient
    """A client of the API with the bootstrap key."""
    ingest: ServiceProcess
    ingest_base: str
    prefix: str


def start_ingest(service: Start, env: dict[str, str], **extra: str) -> tuple[ServiceProcess, str]:
    port = free_port()
    proc = service("iot-ingest", {**env, "IOT_INGEST_HTTP_PORT": str(port), **extra})
    base = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{base}/readyz")
    return proc, base


def ingest_env(database_url: str, redis_url: str, broker: str, prefix: str) -> dict[str, str]:
    return {
        "IOT_DATABASE_URL": database_url,
        "IOT_REDIS_URL": redis_url,
        "IOT_REDIS_PREFIX": prefix,
        "IOT_MQTT_URL": broker,
        "IOT_MQTT_SHARE_GROUP": prefix,
        "IOT_MQTT_CLIENT_ID": f"ingest-{prefix}",
        "IOT_INGEST_BATCH_DELAY_MS": "20",
        "IOT_INGEST_RULES_REFRESH_S": "1",
        "IOT_INGEST_HTTP_AUTH_CACHE_S": "1",
    }


@contextlib.asynccontextmanager
async def platform(
    service: Start,
    database_url: str,
    redis_url: str,
    broker: str,
    *,
    ingest_db: str | None = None,
    **ingest_extra: str,
) -> AsyncIterator[Platform]:
    """``iot-api`` and ``iot-ingest`` sharing one Redis prefix; ingest may reach PostgreSQL elsewhere."""
    prefix = f"h{uuid.uuid4().hex[:10]}"
    api_port = free_port()
    api = service(
        "iot-api",
        {
            "IOT_DATABASE_URL": database_url,
            "IOT_REDIS_URL": redis_url,
            "IOT_REDIS_PREFIX": prefix,
            "IOT_API_PORT": str(api_port),
            "IOT_BOOTSTRAP_API_KEY": BOOTSTRAP_KEY,
            "IOT_API_ROLLUP_INTERVAL_S": "0",
            "IOT_MQTT_URL": broker,
        },
    )
    api_base = f"http://127.0.0.1:{api_port}"
    await asyncio.to_thread(api.wait_http, f"{api_base}/readyz")
    env = {**ingest_env(ingest_db or database_url, redis_url, broker, prefix), **ingest_extra}
    # In a thread: a PostgreSQL proxy of the test runs in this event loop and must serve the start-up.
    ingest, ingest_base = await asyncio.to_thread(start_ingest, service, env)
    client = httpx.AsyncClient(base_url=api_base, headers={"X-API-Key": BOOTSTRAP_KEY}, timeout=15)
    try:
        yield Platform(client, ingest, ingest_base, prefix)
    finally:
        await client.aclose()


async def new_device(api: httpx.AsyncClient, device_id: str) -> str:
    """Create a device through the API, as a user would; its MQTT password (the device's secret)."""
    response = await api.post("/api/v1/devices", json={"id": device_id})
    assert response.status_code == 201, response.text
    mqtt = response.json()["mqtt"]
    assert mqtt["username"] == device_id
    return str(mqtt["password"])


def basic(device_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{device_id}:{secret}".encode()).decode()}


def url(base: str, device_id: str) -> str:
    return f"{base}/ingest/v1/devices/{device_id}/telemetry"


async def test_readings_posted_with_the_device_credential_are_stored_published_and_evaluated(
    service: Start, database_url: str, redis_url: str, broker: str, db: asyncpg.Connection[Any], unique: str
) -> None:
    async with platform(service, database_url, redis_url, broker) as p:
        device, other = f"boiler-{unique}", f"pump-{unique}"
        secret, other_secret = await new_device(p.api, device), await new_device(p.api, other)
        rule = await p.api.post(
            "/api/v1/alert-rules",
            json={"name": "hot", "device_id": device, "metric": "temp", "op": ">", "threshold": 80},
        )
        assert rule.status_code == 201, rule.text
        realtime = start_realtime(service, database_url, redis_url, {"IOT_REDIS_PREFIX": p.prefix})
        async with open_ws(realtime.url(token())) as ws, httpx.AsyncClient(timeout=15) as http:
            frames = await subscribe(ws, 1, [device])
            assert frames[-1]["type"] == "ack", frames

            # The rule is loaded by ingest through the API's announcement; until then no alert could open.
            await wait_for(
                lambda: _true(scrape(p.ingest_base)["iot_ingest_rules_loaded"] == 1), 30, "the rule loaded"
            )
            now_ms = int(time.time() * 1000)
            body = (
                f'[{{"ts": {now_ms - 2000}, "temp": 21.5, "state": "ok"}},'
                f' {{"ts": {now_ms - 1000}, "metrics": {{"temp": Infinity}}}},'
                f' {{"ts": {now_ms}, "temp": 95.0}}]'
            )
            answer = await http.post(
                url(p.ingest_base, device),
                content=body.encode(),
                headers={**basic(device, secret), "Content-Type": "application/json"},
            )
            assert answer.status_code == 200, answer.text
            assert answer.json() == {
                "stored": 2,
                "rejected": [{"index": 1, "reason": "non_finite_value", "detail": "temp: inf"}],
            }
            # Answered after the commit: the rows are there now, not eventually.
            rows = await db.fetch(
                "SELECT metric, value, value_text FROM telemetry WHERE device_id = $1 ORDER BY ts, metric",
                device,
            )
            assert [(r["metric"], r["value"], r["value_text"]) for r in rows] == [
                ("state", None, "ok"),
                ("temp", 21.5, None),
                ("temp", 95.0, None),
            ]
            letter = await db.fetchrow(
                "SELECT reason, topic, detail FROM ingest_rejects WHERE device_id = $1", device
            )
            assert letter is not None
            assert letter["reason"] == "non_finite_value"
            assert letter["topic"] == f"/ingest/v1/devices/{device}/telemetry"

            # On the WebSocket, like an MQTT reading (both readings of the request, in order).
            events = []
            while len(events) < 2:
                frame = await recv_json(ws)
                if frame["type"] == "telemetry":
                    events.append(frame)
            assert [e["metrics"].get("temp") for e in events] == [21.5, 95.0]

            async def latest() -> bool:
                got = await p.api.get(f"/api/v1/devices/{device}/latest")
                return got.status_code == 200 and "95" in got.text

            await wait_for(latest, 10, "latest values through the API")

            async def alert_open() -> bool:
                alerts = await p.api.get("/api/v1/alerts", params={"device_id": device})
                return alerts.status_code == 200 and len(alerts.json()["items"]) == 1

            await wait_for(alert_open, 15, "the alert opened by the posted reading")

            # A token (Bearer secret) names the device of the path; gzip is accepted.
            gz = await http.post(
                url(p.ingest_base, device),
                content=gzip.compress(json.dumps({"ts": now_ms + 1, "temp": 20}).encode()),
                headers={
                    "Authorization": f"Bearer {secret}",
                    "Content-Type": "application/json",
                    "Content-Encoding": "gzip",
                },
            )
            assert gz.status_code == 200, gz.text
            assert gz.json() == {"stored": 1, "rejected": []}

            # Another device's valid credential: 403. A wrong one, none, or a token of another device: 401.
            forbidden = await http.post(
                url(p.ingest_base, device), json={"temp": 1}, headers=basic(other, other_secret)
            )
            assert forbidden.status_code == 403, forbidden.text
            assert forbidden.headers["content-type"].startswith("application/problem+json")
            for headers in (
                basic(device, secret + "x"),
                {},
                {"Authorization": f"Bearer {other_secret}"},
                basic(f"ghost-{unique}", secret),
            ):
                refused = await http.post(url(p.ingest_base, device), json={"temp": 1}, headers=headers)
                assert refused.status_code == 401, (headers, refused.text)
                assert refused.headers["www-authenticate"].startswith("Basic")

            # A fully invalid body: 422 naming the reasons, and its dead letters.
            invalid = await http.post(
                url(p.ingest_base, other),
                json=[{"9x": 1}, {"ts": "yesterday", "t": 1}],
                headers=basic(other, other_secret),
            )
            assert invalid.status_code == 422, invalid.text
            problem = invalid.json()
            assert problem["status"] == 422
            assert [(r["index"], r["reason"]) for r in problem["rejected"]] == [
                (0, "invalid_metric_name"),
                (1, "invalid_timestamp"),
            ]
            reasons = await db.fetch(
                "SELECT reason FROM ingest_rejects WHERE device_id = $1 ORDER BY reason", other
            )
            assert [r["reason"] for r in reasons] == ["invalid_metric_name", "invalid_timestamp"]
            assert await db.fetchval("SELECT count(*) FROM telemetry WHERE device_id = $1", other) == 0

            # A malformed body: 422 naming the whole body, not a 5xx; a wrong Content-Type: 415.
            malformed = await http.post(
                url(p.ingest_base, device),
                content=b"{not json",
                headers={**basic(device, secret), "Content-Type": "application/json"},
            )
            assert malformed.status_code == 422
            assert [(r["index"], r["reason"]) for r in malformed.json()["rejected"]] == [
                (None, "malformed_json")
            ]
            text = await http.post(
                url(p.ingest_base, device),
                content=b'{"temp": 1}',
                headers={**basic(device, secret), "Content-Type": "text/plain"},
            )
            assert text.status_code == 415
            # aiohttp's own refusals under /ingest/ are problem details too; /metrics is not under it.
            wrong_method = await http.get(url(p.ingest_base, device), headers=basic(device, secret))
            assert wrong_method.status_code == 405
            assert wrong_method.headers["content-type"].startswith("application/problem+json")
            assert wrong_method.headers["allow"] == "POST"
            nowhere = await http.post(f"{p.ingest_base}/ingest/v1/devices/{device}/other", json={})
            assert nowhere.status_code == 404
            assert nowhere.json()["status"] == 404

            # Revocation through the API is honoured within the credential cache's TTL (1 s here).
            assert (await p.api.delete(f"/api/v1/devices/{device}/credentials")).status_code == 204

            async def revoked() -> bool:
                again = await http.post(
                    url(p.ingest_base, device), json={"temp": 1}, headers=basic(device, secret)
                )
                return again.status_code == 401

            await wait_for(revoked, 10, "the revoked credential refused")
        assert realtime.proc.stop() == 0
        assert p.ingest.stop() == 0


async def test_a_backfill_of_10000_readings_posted_twice_is_stored_once(
    service: Start, database_url: str, redis_url: str, broker: str, db: asyncpg.Connection[Any], unique: str
) -> None:
    # The second post comes at once: a device bucket of 20,000 readings takes both (the default, 10,000
    # refilled at 1,000/s, answers 429 with Retry-After until it is full again).
    quota = {
        "IOT_INGEST_MAX_READINGS_PER_DEVICE_S": "10000",
        "IOT_INGEST_MAX_READINGS_PER_DEVICE_BURST": "20000",
    }
    async with platform(service, database_url, redis_url, broker, **quota) as p:
        device = f"meter-{unique}"
        secret = await new_device(p.api, device)
        start_ms = int(time.time() * 1000) - 20_000_000
        body = gzip.compress(
            json.dumps([{"ts": start_ms + i * 1000, "kwh": i, "v": 230} for i in range(10_000)]).encode()
        )
        headers = {**basic(device, secret), "Content-Type": "application/json", "Content-Encoding": "gzip"}
        async with httpx.AsyncClient(timeout=30) as http:
            for _ in range(2):
                answer = await http.post(url(p.ingest_base, device), content=body, headers=headers)
                assert answer.status_code == 200, answer.text
                assert answer.json() == {"stored": 10_000, "rejected": []}
                assert (
                    await db.fetchval("SELECT count(*) FROM telemetry WHERE device_id = $1", device) == 20_000
                )
            too_many = gzip.compress(json.dumps([{"kwh": 1}] * 10_001).encode())
            refused = await http.post(url(p.ingest_base, device), content=too_many, headers=headers)
            assert refused.status_code == 422
            assert refused.json()["rejected"][0]["reason"] == "too_many_readings"
            # A gzip bomb stops at the body limit (8 MiB by default) once decompressed.
            bomb = gzip.compress(b"[" + b" " * (64 * 1024 * 1024) + b"]")
            assert len(bomb) < 1024 * 1024
            boom = await http.post(url(p.ingest_base, device), content=bomb, headers=headers)
            assert boom.status_code == 413, boom.text
        assert p.ingest.stop() == 0


@pytest.fixture
async def pg_proxy(database_url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    netloc = f"{parts.username}@127.0.0.1:{proxy.port}" if parts.username else f"127.0.0.1:{proxy.port}"
    yield proxy, urlunsplit(parts._replace(netloc=netloc))
    with contextlib.suppress(Exception):
        await proxy.cut()


async def test_postgres_cut_answers_503_and_acknowledges_nothing_that_is_not_stored(
    service: Start,
    database_url: str,
    redis_url: str,
    broker: str,
    db: asyncpg.Connection[Any],
    unique: str,
    pg_proxy: tuple[TcpProxy, str],
) -> None:
    proxy, proxied_url = pg_proxy
    async with platform(service, database_url, redis_url, broker, ingest_db=proxied_url) as p:
        device = f"cut-{unique}"
        secret = await new_device(p.api, device)
        base_ms = int(time.time() * 1000) - 600_000
        answers: dict[int, int] = {}
        retry_after: set[str] = set()
        stop = asyncio.Event()

        async def post_forever(http: httpx.AsyncClient) -> None:
            seq = 0
            while not stop.is_set():
                response = await http.post(
                    url(p.ingest_base, device),
                    json={"ts": base_ms + seq, "seq": seq},
                    headers=basic(device, secret),
                )
                answers[seq] = response.status_code
                if response.status_code == 503:
                    retry_after.add(response.headers.get("Retry-After", ""))
                    await asyncio.sleep(0.05)  # a client honouring the answer a little (not waiting on it)
                seq += 1

        async with httpx.AsyncClient(timeout=30) as http:
            posting = asyncio.create_task(post_forever(http))
            await wait_for(
                lambda: _true(sum(1 for s in answers.values() if s == 200) >= 20), 15, "first 200s"
            )
            await proxy.cut()
            await wait_for(lambda: _true(503 in answers.values()), 30, "a 503 while PostgreSQL is cut")
            await wait_for(lambda: _true(list(answers.values())[-3:] == [503, 503, 503]), 30, "503s in a row")
            await proxy.start()
            ok_before = sum(1 for s in answers.values() if s == 200)
            await wait_for(
                lambda: _true(sum(1 for s in answers.values() if s == 200) >= ok_before + 20),
                60,
                "200s again once PostgreSQL is back",
            )
            stop.set()
            await posting
        assert set(answers.values()) <= {200, 503}, set(answers.values())
        assert retry_after, "no 503"
        assert all(v.isdigit() and int(v) > 0 for v in retry_after), retry_after
        stored = {
            int(r["seq"])
            for r in await db.fetch(
                "SELECT (extract(epoch FROM ts) * 1000)::bigint - $1 AS seq"
                " FROM telemetry WHERE device_id = $2",
                base_ms,
                device,
            )
        }
        acknowledged = {seq for seq, status in answers.items() if status == 200}
        missing = sorted(acknowledged - stored)
        assert not missing, f"answered 200 but not stored: {missing[:10]}"
        # In a thread: its drain goes through the proxy, which runs in this event loop.
        assert await asyncio.to_thread(p.ingest.stop) == 0


async def _true(value: bool) -> bool:
    return value


async def test_a_device_reports_its_state_over_http(
    service: Start, database_url: str, redis_url: str, broker: str, unique: str
) -> None:
    async with platform(service, database_url, redis_url, broker) as p:
        device = f"thermo-{unique}"
        secret = await new_device(p.api, device)
        patched = await p.api.patch(
            f"/api/v1/devices/{device}/state", json={"desired": {"target_temperature": 21}}
        )
        assert patched.status_code == 200, patched.text
        version = patched.json()["version"]
        state_url = f"{p.ingest_base}/ingest/v1/devices/{device}/state/reported"
        headers = {**basic(device, secret), "Content-Type": "application/json"}
        async with httpx.AsyncClient(timeout=15) as http:
            answer = await http.post(
                state_url, json={"reported": {"target_temperature": 21}, "version": version}, headers=headers
            )
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"stored": 1, "rejected": []}
            # Answered after the commit: the API reads it now, and the delta is empty.
            state = (await p.api.get(f"/api/v1/devices/{device}/state")).json()
            assert state["reported"] == {"target_temperature": 21}
            assert state["delta"] == {}

            bad = await http.post(state_url, json={"reported": "warm"}, headers=headers)
            assert bad.status_code == 422, bad.text
            assert bad.json()["rejected"][0]["reason"] == "invalid_state_report"
            other = await http.post(
                f"{p.ingest_base}/ingest/v1/devices/{device}-x/state/reported",
                json={"reported": {}},
                headers=headers,
            )
            assert other.status_code == 403, other.text
