"""``GET /dashboard/config.json``: where the dashboard finds the realtime service (IOT_PUBLIC_REALTIME_URL),
public, never cached, and the page's Content-Security-Policy lets it connect there."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.api.conftest import ClientFactory
from tests.integration.api.test_security_headers import directives


@pytest.fixture
def dashboard(tmp_path: Path) -> Path:
    (tmp_path / "index.html").write_text('<!doctype html><title>d</title><script src="app.js"></script>')
    return tmp_path


def assert_never_cached(headers: object) -> None:
    cache_control = {part.strip() for part in str(headers["cache-control"]).split(",")}  # type: ignore[index]
    assert {"no-cache", "no-store"} <= cache_control


async def test_unset_the_config_says_null_and_the_page_keeps_its_port_8001_guess(
    make_client: ClientFactory, dashboard: Path
) -> None:
    client = await make_client(dashboard_dir=str(dashboard))
    response = await client.get("/dashboard/config.json", headers={"Host": "iot.example.com:8000"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"realtime_url": None}
    assert_never_cached(response.headers)
    page = await client.get("/dashboard/", headers={"Host": "iot.example.com:8000"})
    assert directives(page)["connect-src"] == "'self' ws://iot.example.com:8001 wss://iot.example.com:8001"


async def test_a_websocket_url_is_given_as_is_and_its_origin_allowed(
    make_client: ClientFactory, dashboard: Path
) -> None:
    client = await make_client(
        dashboard_dir=str(dashboard), public_realtime_url="wss://rt.example.com:8443/live/ws"
    )
    # No credential: the page reads it before anyone signs in.
    response = await client.get("/dashboard/config.json")
    assert response.status_code == 200
    assert response.json() == {"realtime_url": "wss://rt.example.com:8443/live/ws"}
    assert_never_cached(response.headers)
    page = await client.get("/dashboard/", headers={"Host": "iot.example.com"})
    assert directives(page)["connect-src"] == "'self' wss://rt.example.com:8443"


async def test_a_url_without_a_path_gets_the_realtime_services_path(
    make_client: ClientFactory, dashboard: Path
) -> None:
    client = await make_client(dashboard_dir=str(dashboard), public_realtime_url="ws://127.0.0.1:9101")
    assert (await client.get("/dashboard/config.json")).json() == {"realtime_url": "ws://127.0.0.1:9101/ws"}


async def test_a_path_is_left_for_the_page_to_resolve_on_its_own_host(
    make_client: ClientFactory, dashboard: Path
) -> None:
    client = await make_client(dashboard_dir=str(dashboard), public_realtime_url="/ws")
    response = await client.get("/dashboard/config.json", headers={"Host": "iot.example.com"})
    assert response.json() == {"realtime_url": "/ws"}
    assert_never_cached(response.headers)
    page = await client.get("/dashboard/", headers={"Host": "iot.example.com"})
    # Its own host, under either scheme (the API behind a TLS-terminating Ingress sees plain HTTP).
    assert directives(page)["connect-src"] == "'self' ws://iot.example.com wss://iot.example.com"
    hostile = await client.get("/dashboard/", headers={"Host": "x; script-src *"})
    assert directives(hostile)["connect-src"] == "'self'"
    assert directives(hostile)["script-src"] == "'self'"


async def test_the_configured_url_comes_on_top_of_the_listed_sources(
    make_client: ClientFactory, dashboard: Path
) -> None:
    client = await make_client(
        dashboard_dir=str(dashboard),
        dashboard_connect_src=["https://api.example.com", "wss://rt.example.com"],
        public_realtime_url="wss://rt.example.com/ws",
    )
    page = await client.get("/dashboard/")
    assert directives(page)["connect-src"] == "'self' https://api.example.com wss://rt.example.com"


async def test_only_get_reads_the_config(make_client: ClientFactory) -> None:
    client = await make_client(public_realtime_url="/ws")
    assert (await client.post("/dashboard/config.json", json={})).status_code == 405
