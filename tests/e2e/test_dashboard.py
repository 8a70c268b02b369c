"""The dashboard in headless Chromium against the running platform and the device simulator.

Served three ways: from its own origin (a static server), calling the API and the realtime endpoint
cross-origin as an external frontend would, told where both are by ``?api=&ws=``; by the API at the address
``make run`` prints, finding the realtime service from ``config.json`` (``IOT_PUBLIC_REALTIME_URL``); and
behind one origin routed like the Kubernetes Ingress, where ``config.json`` says ``/ws``. Screenshots are
kept under artifacts/.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import gmqtt
import httpx
import msgspec
import pytest
from playwright.sync_api import ConsoleMessage, expect, sync_playwright

from iot_api.edge import DEFAULT_REALTIME_PORT
from iot_common.auth import generate_api_key
from iot_common.topics import command_ack_topic, command_topic
from iot_testkit.processes import ServiceProcess, free_port, mosquitto
from tests.e2e.ingress_proxy import IngressProxy

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "dashboard" / "dist"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN = ("admin@example.com", "dashboard-test-password")
Start = Callable[[str, Mapping[str, str]], ServiceProcess]


@pytest.fixture
def static_origin() -> Iterator[str]:
    """The built dashboard on its own origin."""
    if not (DIST / "index.html").exists():
        pytest.fail("dashboard/dist is missing: run `make install` (it builds the dashboard)")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(DIST))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


class AckingDevice:
    """A device that answers every command it receives on its command topic."""

    def __init__(self, mqtt_url: str, device_id: str) -> None:
        self.url, self.device_id = mqtt_url, device_id
        self.received: list[dict[str, object]] = []
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)
        self._stop = threading.Event()

    async def _run(self) -> None:
        client = gmqtt.Client(f"acker-{self.device_id}")

        def on_message(_c: object, _topic: str, payload: bytes, _q: int, _p: object) -> int:
            command = msgspec.json.decode(payload)
            self.received.append(command)
            ack = {"id": command["id"], "status": "ok", "result": {"done": True}}
            client.publish(command_ack_topic(self.device_id), msgspec.json.encode(ack), qos=1)
            return 0

        client.on_message = on_message
        host, port = self.url.removeprefix("mqtt://").split(":")
        await client.connect(host, int(port))
        client.subscribe(command_topic(self.device_id), qos=1)
        await asyncio.to_thread(self._stop.wait)
        await client.disconnect()

    def __enter__(self) -> AckingDevice:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.mark.parametrize("served_by", ["static", "api", "ingress"])
def test_dashboard_shows_live_data_alerts_and_sends_commands(
    served_by: str,
    service: Start,
    database_url: str,
    redis_url: str,
    static_origin: str,
    unique: str,
    artifacts_dir: Path,
) -> None:
    """``static``: the page on its own origin calls the API cross-origin. ``api`` and ``ingress``: the API
    serves the page under its Content-Security-Policy (a blocked script, style or connection is a console
    error) and the page connects where ``config.json`` says."""
    api_key = generate_api_key()[0]
    api_port, rt_port, ingest_port = free_port(), free_port(), free_port()
    # Not the port the page guesses without config.json: found only through it.
    assert rt_port != DEFAULT_REALTIME_PORT
    proxy = IngressProxy(api_port, rt_port)
    public_realtime_url = {
        "static": "",
        "api": f"ws://127.0.0.1:{rt_port}/ws",
        "ingress": "/ws",
    }[served_by]
    prefix = f"dash{unique}"
    with mosquitto() as mqtt_url, proxy as proxy_origin:
        common = {
            "IOT_DATABASE_URL": database_url,
            "IOT_REDIS_URL": redis_url,
            "IOT_MQTT_URL": mqtt_url,
            # The page's origin: the static server, the API serving it, or the Ingress (the realtime
            # service checks it).
            "IOT_CORS_ORIGINS": f"{static_origin},http://127.0.0.1:{api_port},{proxy_origin}",
            "IOT_REDIS_PREFIX": f"dash{unique}",
        }
        api = service(
            "iot-api",
            {
                **common,
                "IOT_API_PORT": str(api_port),
                "IOT_BOOTSTRAP_API_KEY": api_key,
                "IOT_BOOTSTRAP_ADMIN_EMAIL": ADMIN[0],
                "IOT_BOOTSTRAP_ADMIN_PASSWORD": ADMIN[1],
                "IOT_DASHBOARD_DIR": str(DIST),
                "IOT_PUBLIC_REALTIME_URL": public_realtime_url,
            },
        )
        realtime = service("iot-realtime", {**common, "IOT_REALTIME_PORT": str(rt_port)})
        ingest = service(
            "iot-ingest",
            {
                **common,
                "IOT_INGEST_HTTP_PORT": str(ingest_port),
                "IOT_MQTT_SHARE_GROUP": f"dash-{unique}",
                "IOT_MQTT_CLIENT_ID": f"dash-{unique}",
            },
        )
        for proc, port in ((api, api_port), (realtime, rt_port), (ingest, ingest_port)):
            proc.wait_http(f"http://127.0.0.1:{port}/readyz")
        base = f"http://127.0.0.1:{api_port}"
        headers = {"X-API-Key": api_key}
        rule = {
            "name": "too hot",
            "device_type": "simulated",
            "metric": "temperature",
            "op": ">",
            "threshold": 45.0,
            "hysteresis": 5.0,
            "severity": "critical",
            "message": "temperature spike",
        }
        assert httpx.post(f"{base}/api/v1/alert-rules", json=rule, headers=headers).status_code == 201

        def stop_realtime() -> None:
            assert realtime.stop() == 0

        def start_realtime() -> None:
            again = service("iot-realtime", {**common, "IOT_REALTIME_PORT": str(rt_port)})
            again.wait_http(f"http://127.0.0.1:{rt_port}/readyz")

        ws = f"ws://127.0.0.1:{rt_port}/ws"
        # Served by the API: the address make run prints (without the trailing slash), nothing in the query.
        page_url, expected_ws = {
            "static": (f"{static_origin}/index.html?api={base}&ws={ws}", ws),
            "api": (f"{base}/dashboard", ws),
            "ingress": (f"{proxy_origin}/dashboard", f"ws://127.0.0.1:{proxy.port}/ws"),
        }[served_by]
        run_browser(
            (stop_realtime, start_realtime),
            page_url,
            expected_ws,
            base,
            mqtt_url,
            prefix,
            api_key,
            artifacts_dir,
        )


def run_browser(
    realtime_stop_start: tuple[Callable[[], None], Callable[[], None]],
    page_url: str,
    expected_ws: str,
    api: str,
    mqtt_url: str,
    prefix: str,
    api_key: str,
    artifacts: Path,
) -> None:
    sim = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "iot-sim"),
            "--devices",
            "3",
            "--rate",
            "5",
            "--prefix",
            prefix,
            "--spike-probability",
            "0.02",
            "--mqtt-url",
            mqtt_url,
            "--api-url",
            api,
            "--api-key",
            api_key,
            "--will",
            "--quiet",
        ],
        stdout=(artifacts / "sim.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    errors: list[str] = []
    restarting = threading.Event()
    device = f"{prefix}-0000"
    try:
        _wait_registered(api, api_key, device)
        with AckingDevice(mqtt_url, device) as acker, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1366, "height": 800})
            page.on("console", lambda m: _keep_error(m, errors, restarting.is_set()))
            page.on("pageerror", lambda e: errors.append(str(e)))
            requested: list[str] = []
            page.on("request", lambda r: requested.append(r.url))
            sockets: list[str] = []
            page.on("websocket", lambda w: sockets.append(w.url))
            page.goto(page_url)
            page.get_by_label("Email", exact=True).fill(ADMIN[0])
            page.get_by_label("Password", exact=True).fill(ADMIN[1])
            page.get_by_role("button", name="Sign in").click()
            row = page.locator(f'tr[data-device="{device}"]')
            expect(row).to_be_visible(timeout=20_000)
            page.screenshot(path=str(artifacts / "1-devices.png"))
            row.click()
            chart = page.locator('figure[data-metric="temperature"]')
            expect(chart).to_be_visible(timeout=20_000)
            first = int(chart.get_attribute("data-points") or "0")
            page.wait_for_function(
                "([n]) => Number(document.querySelector('figure[data-metric=temperature]')"
                ".dataset.points) >= n + 5",
                arg=[first],
                timeout=20_000,
            )
            expect(page.locator("#connection")).to_have_text("Live")
            page.screenshot(path=str(artifacts / "2-live-chart.png"))
            page.locator('#nav a[data-view="alerts"]').click()
            alert = page.locator("#alert-list li").first
            expect(alert).to_be_visible(timeout=60_000)
            expect(alert).to_contain_text("temperature")
            page.screenshot(path=str(artifacts / "3-alert.png"))
            page.locator('#nav a[data-view="devices"]').click()
            # While the realtime service is down, Chromium logs each refused reconnect attempt itself;
            # those (and only those) are expected.
            restarting.set()
            stop_realtime, start_realtime = realtime_stop_start
            stop_realtime()
            # Checked while it is down: once it is back the page may already be live again.
            expect(page.locator("#connection")).to_contain_text("reconnecting", timeout=10_000)
            start_realtime()
            expect(page.locator("#connection")).to_have_text("Live", timeout=20_000)
            # It resumed with `since`: the readings published while the service was down came first.
            page.wait_for_function(
                "() => Number(document.getElementById('charts').dataset.backfilled || 0) > 0", timeout=20_000
            )
            after = int(chart.get_attribute("data-points") or "0")
            page.wait_for_function(
                "([n]) => Number(document.querySelector('figure[data-metric=temperature]')"
                ".dataset.points) >= n + 5",
                arg=[after],
                timeout=20_000,
            )
            page.get_by_label("Command", exact=True).fill("reboot")
            page.get_by_label("Parameters (JSON)").fill('{"delay": 1}')
            page.get_by_role("button", name="Send").click()
            expect(page.locator('#commands li[data-state="acked"]')).to_be_visible(timeout=20_000)
            page.screenshot(path=str(artifacts / "4-command.png"), full_page=True)
            browser.close()
            assert not [url for url in requested if ADMIN[1] in url or "password" in url.lower()]
            assert sockets
            assert all(url.startswith(f"{expected_ws}?token=") for url in sockets), sockets
            assert acker.received
            assert acker.received[0]["name"] == "reboot"
    finally:
        sim.terminate()
        sim.wait(20)
    assert not errors, f"console errors: {errors}"


def _keep_error(message: ConsoleMessage, errors: list[str], restarting: bool) -> None:
    # Refused by the stopped service, or answered 502 by the Ingress in front of it.
    refused = "WebSocket connection to" in message.text and (
        "ERR_CONNECTION_REFUSED" in message.text or "Unexpected response code: 502" in message.text
    )
    if message.type == "error" and not (restarting and refused):
        errors.append(message.text)


def _wait_registered(api: str, api_key: str, device: str) -> None:
    """The simulator registers its devices through the API before publishing; wait for that."""
    for _ in range(100):
        if httpx.get(f"{api}/api/v1/devices/{device}", headers={"X-API-Key": api_key}).status_code == 200:
            return
        time.sleep(0.2)
    raise AssertionError(f"{device} was never registered")
