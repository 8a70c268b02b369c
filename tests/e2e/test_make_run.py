"""``make run`` on this machine: the platform comes up, simulated readings flow, Ctrl-C leaves nothing."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import psutil

from iot_common.auth import generate_api_key
from iot_testkit.processes import free_port, mosquitto

ROOT = Path(__file__).resolve().parents[2]


async def first_telemetry(ws_url: str, api_key: str, device_id: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{ws_url}?token={api_key}") as ws:
        await ws.send_json({"type": "subscribe", "id": 1, "devices": [device_id]})
        while True:
            frame = await ws.receive_json(timeout=20)
            if frame.get("type") == "telemetry" and frame.get("device_id") == device_id:
                return dict(frame)


def test_make_run_starts_everything_shows_data_and_stops_cleanly(
    database_url: str, redis_url: str, unique: str, artifacts_dir: Path
) -> None:
    api_key = generate_api_key()[0]
    secrets_file = artifacts_dir / "run-local.env"
    secrets_file.unlink(missing_ok=True)
    ports = {
        "IOT_API_PORT": free_port(),
        "IOT_REALTIME_PORT": free_port(),
        "IOT_INGEST_HTTP_PORT": free_port(),
    }
    with mosquitto() as mqtt_url:
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "IOT_DATABASE_URL": database_url,
            "IOT_REDIS_URL": redis_url,
            "IOT_MQTT_URL": mqtt_url,
            "IOT_LOG_FORMAT": "json",
            "IOT_MQTT_SHARE_GROUP": f"run-{unique}",
            "IOT_MQTT_CLIENT_ID": f"run-{unique}",
            "IOT_BOOTSTRAP_API_KEY": api_key,
            "IOT_SIM_PREFIX": f"run{unique}",
            "IOT_SIM_DEVICES": "3",
            "IOT_SIM_RATE": "5",
            # No IOT_JWT_SECRET nor admin password: make run generates them and keeps them here.
            "IOT_RUN_SECRETS_FILE": str(secrets_file),
            **{k: str(v) for k, v in ports.items()},
        }
        log_path = artifacts_dir / "make-run.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "scripts" / "run_local.py")],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        try:
            api = f"http://127.0.0.1:{ports['IOT_API_PORT']}"
            device = f"run{unique}-0000"
            deadline = time.monotonic() + 60
            latest: dict[str, object] = {}
            while time.monotonic() < deadline and not latest:
                assert proc.poll() is None, log_path.read_text()
                try:
                    response = httpx.get(
                        f"{api}/api/v1/devices/{device}/latest", headers={"X-API-Key": api_key}
                    )
                    if response.status_code == 200 and response.json().get("metrics"):
                        latest = response.json()
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            assert "temperature" in latest.get("metrics", {}), log_path.read_text()[-4000:]
            saved = dict(line.split("=", 1) for line in secrets_file.read_text().splitlines() if "=" in line)
            assert secrets_file.stat().st_mode & 0o077 == 0, "the secrets file is private to its owner"
            assert len(saved["IOT_JWT_SECRET"]) >= 32
            login = httpx.post(
                f"{api}/api/v1/auth/login",
                json={"email": "admin@example.com", "password": saved["IOT_BOOTSTRAP_ADMIN_PASSWORD"]},
            )
            assert login.status_code == 200, login.text
            assert f"admin@example.com / {saved['IOT_BOOTSTRAP_ADMIN_PASSWORD']}" in log_path.read_text()
            ws_url = f"ws://127.0.0.1:{ports['IOT_REALTIME_PORT']}/ws"
            frame = asyncio.run(first_telemetry(ws_url, api_key, device))
            assert set(frame["metrics"]) >= {"temperature", "humidity", "pressure"}  # type: ignore[call-overload]
            children = psutil.Process(proc.pid).children(recursive=True)
            assert len(children) >= 4
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(60)
        assert code == 0, log_path.read_text()[-4000:]
        time.sleep(0.5)
        left = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"processes left behind: {left}"


def test_make_run_names_the_backend_that_does_not_answer_and_how_to_start_it() -> None:
    closed = free_port()
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run_local.py")],
        env={"PATH": "/usr/bin:/bin", "IOT_REDIS_URL": f"redis://127.0.0.1:{closed}/0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"Redis does not answer at 127.0.0.1:{closed} (IOT_REDIS_URL)" in result.stderr
    assert "redis-server" in result.stderr
    assert "make up" in result.stderr
    assert "PostgreSQL" not in result.stderr
