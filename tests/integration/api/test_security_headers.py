"""Security headers on every response: a strict CSP for the API, a self-only one for the dashboard (plus
the realtime endpoint it connects to), a CDN-only exception for the documentation viewers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from tests.integration.api.conftest import ClientFactory

Client = AsyncTestClient[Any]


def directives(response: Any) -> dict[str, str]:
    policy = response.headers["content-security-policy"]
    parts = [p.strip().split(" ", 1) for p in policy.split(";") if p.strip()]
    return {p[0]: p[1] if len(p) > 1 else "" for p in parts}


def assert_common(response: Any) -> None:
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"


@pytest.fixture
def dashboard(tmp_path: Path) -> Path:
    (tmp_path / "index.html").write_text('<!doctype html><title>d</title><script src="app.js"></script>')
    (tmp_path / "app.js").write_text("console.log(1)")
    return tmp_path


async def test_api_responses_forbid_everything(client: Client, admin: dict[str, str]) -> None:
    for response in (
        await client.get("/api/v1/devices", headers=admin),
        await client.get("/api/v1/devices"),  # 401
        await client.get("/no/such/route"),  # 404
        await client.get("/healthz"),
    ):
        assert directives(response) == {"default-src": "'none'", "frame-ancestors": "'none'"}
        assert_common(response)


async def test_the_dashboard_loads_only_its_own_files_and_connects_to_the_realtime_endpoint(
    make_client: ClientFactory, dashboard: Path
) -> None:
    client = await make_client(dashboard_dir=str(dashboard))
    for path in ("/dashboard/", "/dashboard/app.js", "/dashboard/missing.css"):
        response = await client.get(path, headers={"Host": "iot.example.com:8000"})
        policy = directives(response)
        assert policy["script-src"] == "'self'"
        assert policy["style-src"] == "'self'"
        assert policy["frame-ancestors"] == "'none'"
        assert "unsafe-inline" not in response.headers["content-security-policy"]
        # The dashboard's default realtime URL: ws(s)://<its host>:8001/ws (dashboard/src/main.js).
        assert policy["connect-src"] == "'self' ws://iot.example.com:8001 wss://iot.example.com:8001"
        assert_common(response)
    # A Host header cannot write the policy.
    hostile = await client.get("/dashboard/", headers={"Host": "x; script-src *"})
    assert directives(hostile)["connect-src"] == "'self'"
    assert directives(hostile)["script-src"] == "'self'"


async def test_the_dashboard_connects_where_it_is_configured_to(
    make_client: ClientFactory, dashboard: Path
) -> None:
    client = await make_client(
        dashboard_dir=str(dashboard),
        dashboard_connect_src=["wss://rt.example.com", "https://api.example.com"],
    )
    response = await client.get("/dashboard/")
    assert directives(response)["connect-src"] == "'self' wss://rt.example.com https://api.example.com"


async def test_the_documentation_may_load_its_viewer_from_the_cdn(client: Client) -> None:
    for path in ("/api/docs", "/api/docs/swagger"):
        response = await client.get(path)
        assert response.status_code == 200
        policy = directives(response)
        assert "https://cdn.jsdelivr.net" in policy["script-src"]
        assert policy["default-src"] == "'none'"
        assert policy["frame-ancestors"] == "'none'"
        assert_common(response)
