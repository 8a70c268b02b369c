"""``make run`` on this machine: the platform comes up, simulated readings flow, Ctrl-C leaves nothing.

Two ways: with the embedded PostgreSQL, Redis and MQTT broker from .venv on free ports (no service of the
machine involved), and with the machine's services (a private database, Redis prefix and broker). Both
runs go through the same list of checks, :data:`LIVE_CHECKS`, a user's view of a running platform.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import httpx
import psutil

from iot_common.auth import generate_api_key
from iot_common.tenancy import DEFAULT_TENANT_ID
from iot_sim.demo import DEMO_RULE_NAME
from iot_testkit.backends import port_open
from iot_testkit.processes import free_port, mosquitto

ROOT = Path(__file__).resolve().parents[2]
RUN_LOCAL = ROOT / "scripts" / "run_local.py"


@dataclass
class Run:
    """A ``make run`` in progress: its process, its log and where its services are."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    ports: dict[str, int]
    secrets_file: Path
    device: str
    children: list[psutil.Process] = field(default_factory=list)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['IOT_API_PORT']}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.ports['IOT_REALTIME_PORT']}/ws"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def saved(self) -> dict[str, str]:
        lines = self.secrets_file.read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))

    @property
    def api_key(self) -> str:
        return self.saved()["IOT_BOOTSTRAP_API_KEY"]


def free_ports(*names: str) -> dict[str, int]:
    ports: dict[str, int] = {}
    while len(set(ports.values())) < len(names):
        ports = {name: free_port() for name in names}
    return ports


@contextlib.contextmanager
def make_run(env: dict[str, str], ports: dict[str, int], artifacts_dir: Path, prefix: str) -> Iterator[Run]:
    """``make run``'s entry point with ``env`` (and a private secrets file), stopped with SIGINT after."""
    secrets_file = artifacts_dir / "run-local.env"
    secrets_file.unlink(missing_ok=True)
    shutil.rmtree(artifacts_dir / "local", ignore_errors=True)  # an earlier run's data, with its admin
    log_path = artifacts_dir / "make-run.log"
    full_env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "IOT_LOG_FORMAT": "json",
        "IOT_SIM_PREFIX": prefix,
        "IOT_SIM_DEVICES": "3",
        "IOT_SIM_RATE": "5",
        "IOT_SIM_SPIKE_PROBABILITY": "0.05",  # a demo alert within seconds, not minutes
        # No IOT_JWT_SECRET, admin password nor API key: make run generates them and keeps them here.
        "IOT_RUN_SECRETS_FILE": str(secrets_file),
        "IOT_LOCAL_DIR": str(artifacts_dir / "local"),
        **env,
        **{k: str(v) for k, v in ports.items()},
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(RUN_LOCAL)], env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
    run = Run(proc, log_path, ports, secrets_file, f"{prefix}-0000")
    try:
        yield run
    finally:
        if proc.poll() is None:
            run.children = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                for child in [*run.children, psutil.Process(proc.pid)]:
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                raise


def wait_until_running(run: Run) -> None:
    deadline = time.monotonic() + 120
    while "IoT platform running" not in run.log():
        assert run.proc.poll() is None, run.log()[-6000:]
        assert time.monotonic() < deadline, run.log()[-6000:]
        time.sleep(0.2)


def stopped_cleanly(run: Run) -> None:
    """Exit code 0, no process of the run left, nothing listening on any port it used."""
    assert run.proc.returncode == 0, run.log()[-6000:]
    psutil.wait_procs(run.children, timeout=10)
    left = [c for c in run.children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {left}"
    still_open = {name: port for name, port in run.ports.items() if port_open("127.0.0.1", port)}
    assert not still_open, f"still listening after Ctrl-C: {still_open}"


# What a user checks on a running platform. Both runs go through all of them.


def check_readings_in_the_api(run: Run) -> None:
    deadline = time.monotonic() + 60
    latest: dict[str, object] = {}
    while time.monotonic() < deadline and not latest:
        response = httpx.get(
            f"{run.api}/api/v1/devices/{run.device}/latest", headers={"X-API-Key": run.api_key}
        )
        if response.status_code == 200 and response.json().get("metrics"):
            latest = response.json()
        else:
            time.sleep(0.5)
    assert "temperature" in latest.get("metrics", {}), run.log()[-4000:]


async def first_telemetry(ws_url: str, api_key: str, device_id: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{ws_url}?token={api_key}") as ws:
        await ws.send_json({"type": "subscribe", "id": 1, "devices": [device_id]})
        while True:
            frame = await ws.receive_json(timeout=20)
            if frame.get("type") == "telemetry" and frame.get("device_id") == device_id:
                return dict(frame)


def check_readings_over_the_websocket(run: Run) -> None:
    frame = asyncio.run(first_telemetry(run.ws, run.api_key, run.device))
    assert set(frame["metrics"]) >= {"temperature", "humidity", "pressure"}  # type: ignore[call-overload]


def check_the_printed_login_works(run: Run) -> None:
    saved = run.saved()
    assert run.secrets_file.stat().st_mode & 0o077 == 0, "the secrets file is private to its owner"
    assert len(saved["IOT_JWT_SECRET"]) >= 32
    login = httpx.post(
        f"{run.api}/api/v1/auth/login",
        json={"email": "admin@example.com", "password": saved["IOT_BOOTSTRAP_ADMIN_PASSWORD"]},
    )
    assert login.status_code == 200, login.text
    assert f"admin@example.com / {saved['IOT_BOOTSTRAP_ADMIN_PASSWORD']}" in run.log()
    assert f"API key      {saved['IOT_BOOTSTRAP_API_KEY']}" in run.log()
    # Both are the platform's admins: they see the tenants (docs/tenancy.md).
    bearer = {"Authorization": f"Bearer {login.json()['access_token']}"}
    me = httpx.get(f"{run.api}/api/v1/auth/me", headers=bearer).json()
    assert (me["role"], me["platform_admin"]) == ("admin", True)
    for headers in (bearer, {"X-API-Key": run.api_key}):
        tenants = httpx.get(f"{run.api}/api/v1/tenants", headers=headers)
        assert tenants.status_code == 200, tenants.text
        assert [t["name"] for t in tenants.json()["items"]] == ["default"]


def check_the_demo_alert_rule(run: Run) -> None:
    rules = httpx.get(
        f"{run.api}/api/v1/alert-rules/",
        params={"device_type": "simulated"},
        headers={"X-API-Key": run.api_key},
    ).json()["items"]
    demo = [r for r in rules if r["name"] == DEMO_RULE_NAME]
    assert len(demo) == 1
    assert (demo[0]["metric"], demo[0]["op"]) == ("temperature", ">")
    assert 21 + 5 < demo[0]["threshold"] < 21 + 40, "above the normal values, below the simulator's spikes"


def poll(what: str, get: Callable[[], object | None], run: Run, timeout: float = 60) -> object:
    deadline = time.monotonic() + timeout
    while (found := get()) is None:
        assert time.monotonic() < deadline, f"{what}: not seen in {timeout} s\n{run.log()[-4000:]}"
        time.sleep(0.3)
    return found


def check_a_command_is_acked_by_a_simulated_device(run: Run) -> None:
    headers = {"X-API-Key": run.api_key}
    commands = f"{run.api}/api/v1/devices/{run.device}/commands"
    sent = httpx.post(commands, json={"name": "ping", "params": {}}, headers=headers)
    assert sent.status_code == 201, sent.text

    def acked() -> dict[str, object] | None:
        command = httpx.get(f"{commands}/{sent.json()['id']}", headers=headers).json()
        return command if command["state"] == "acked" else None

    command = poll("command acked", acked, run)
    assert command["result"]["pong"] is True  # type: ignore[index]


def check_the_demo_rule_opens_an_alert_on_a_spike(run: Run) -> None:
    headers = {"X-API-Key": run.api_key}
    (rule,) = [
        r
        for r in httpx.get(
            f"{run.api}/api/v1/alert-rules/", params={"device_type": "simulated"}, headers=headers
        ).json()["items"]
        if r["name"] == DEMO_RULE_NAME
    ]

    def opened() -> dict[str, object] | None:
        alerts = httpx.get(f"{run.api}/api/v1/alerts", headers=headers).json()["items"]
        return next((a for a in alerts if a["rule_id"] == rule["id"]), None)

    alert = poll("demo alert", opened, run)
    assert alert["metric"] == "temperature"


def listening_addresses(ports: set[int]) -> list[psutil._common.addr]:
    return [c.laddr for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port in ports]


def check_services_listen_on_loopback_only(run: Run) -> None:
    service_ports = {run.ports[k] for k in ("IOT_API_PORT", "IOT_REALTIME_PORT", "IOT_INGEST_HTTP_PORT")}
    listening = [
        c.laddr
        for c in psutil.net_connections("inet")
        if c.status == "LISTEN" and c.laddr.port in service_ports
    ]
    assert {a.port for a in listening} == service_ports
    assert {a.ip for a in listening} == {"127.0.0.1"}, listening


def check_the_log_has_no_colour_codes_and_one_rollup_line(run: Run) -> None:
    log = run.log()
    assert "\x1b[" not in log, "colour codes in a log that is not a terminal"
    assert log.count("telemetry rolled up") <= 1, "one rollup line per run, not one per batch"


LIVE_CHECKS: list[Callable[[Run], None]] = [
    check_readings_in_the_api,
    check_readings_over_the_websocket,
    check_the_printed_login_works,
    check_the_demo_alert_rule,
    check_services_listen_on_loopback_only,
    check_a_command_is_acked_by_a_simulated_device,
    check_the_demo_rule_opens_an_alert_on_a_spike,
    check_the_log_has_no_colour_codes_and_one_rollup_line,
]


def test_make_run_with_embedded_backends_on_free_ports_shows_data_and_stops_cleanly(
    unique: str, artifacts_dir: Path
) -> None:
    ports = free_ports("pg", "redis", "mqtt", "IOT_API_PORT", "IOT_REALTIME_PORT", "IOT_INGEST_HTTP_PORT")
    env = {
        "IOT_LOCAL_BACKENDS": "embedded",
        "IOT_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{ports.pop('pg')}/iot",
        "IOT_REDIS_URL": f"redis://127.0.0.1:{ports.pop('redis')}/0",
        "IOT_MQTT_URL": f"mqtt://127.0.0.1:{ports.pop('mqtt')}",
    }
    backend_ports = {
        var: int(url.rsplit(":", 1)[1].split("/")[0]) for var, url in env.items() if "URL" in var
    }
    with make_run(env, ports, artifacts_dir, f"emb{unique}") as run:
        run.ports.update(backend_ports)
        wait_until_running(run)
        for check in LIVE_CHECKS:
            check(run)
        log = run.log()
        for name in ("PostgreSQL", "Redis", "MQTT broker"):
            assert f"embedded {name} ready on 127.0.0.1:" in log
        assert "for local use only" in log
        assert "ingest subscribes without $share" in log
        listening = {
            c.laddr
            for c in psutil.net_connections("inet")
            if c.status == "LISTEN" and c.laddr.port in backend_ports.values()
        }
        assert {a.ip for a in listening} == {"127.0.0.1"}, listening
    stopped_cleanly(run)
    assert (artifacts_dir / "local" / "postgres" / "data" / "PG_VERSION").exists(), "the data stays"


async def add_stale_bootstrap_key(database_url: str) -> str:
    """A key named ``bootstrap`` as earlier versions of make run left one per run."""
    key, prefix, key_hash = generate_api_key()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO api_keys (tenant_id, name, prefix, key_hash, scopes)"
            " VALUES ($4, 'bootstrap', $1, $2, $3)",
            prefix,
            key_hash,
            ["admin"],
            DEFAULT_TENANT_ID,
        )
    finally:
        await conn.close()
    return key


def test_make_run_with_the_system_services_shows_data_reuses_its_key_and_stops_cleanly(
    database_url: str, redis_url: str, unique: str, artifacts_dir: Path
) -> None:
    stale_key = asyncio.run(add_stale_bootstrap_key(database_url))
    ports = free_ports("IOT_API_PORT", "IOT_REALTIME_PORT", "IOT_INGEST_HTTP_PORT")
    with mosquitto() as mqtt_url:
        env = {
            "IOT_LOCAL_BACKENDS": "system",
            "IOT_DATABASE_URL": database_url,
            "IOT_REDIS_URL": redis_url,
            "IOT_REDIS_PREFIX": f"run{unique}",
            "IOT_MQTT_URL": mqtt_url,
            "IOT_MQTT_SHARE_GROUP": f"run-{unique}",
            "IOT_MQTT_CLIENT_ID": f"run-{unique}",
        }
        with make_run(env, ports, artifacts_dir, f"sys{unique}") as run:
            wait_until_running(run)
            for check in LIVE_CHECKS:
                check(run)
            backends = run.log().split("Backends (")[1].split("Turned on")[0]
            assert "embedded" not in backends
            screenshot_dashboard(run, artifacts_dir / "dashboard.png")
            assert "revoked 1 API key(s) named 'bootstrap'" in run.log()
            stale = httpx.get(f"{run.api}/api/v1/api-keys/", headers={"X-API-Key": stale_key})
            assert stale.status_code == 401
        stopped_cleanly(run)


def screenshot_dashboard(run: Run, path: Path) -> None:
    """What make run shows at the address it prints, signed in with the login it prints (the README's
    screenshot, docs/img/dashboard.png, is this one)."""
    from playwright.sync_api import expect, sync_playwright

    from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(f"{run.api}/dashboard")
        page.get_by_label("Email", exact=True).fill(
            run.saved().get("IOT_BOOTSTRAP_ADMIN_EMAIL", "admin@example.com")
        )
        page.get_by_label("Password", exact=True).fill(run.saved()["IOT_BOOTSTRAP_ADMIN_PASSWORD"])
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#connection")).to_have_text("Live", timeout=20_000)
        page.wait_for_function(
            "() => Number(document.querySelector('figure[data-metric=temperature]')"
            "?.dataset.points || 0) > 20",
            timeout=30_000,
        )
        page.screenshot(path=str(path))
        browser.close()


def run_local_until_exit(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUN_LOCAL)],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_make_run_in_system_mode_names_the_backend_that_does_not_answer_and_how_to_start_it(
    tmp_path: Path,
) -> None:
    closed = free_port()
    result = run_local_until_exit(
        {
            "IOT_LOCAL_BACKENDS": "system",
            "IOT_REDIS_URL": f"redis://127.0.0.1:{closed}/0",
            "IOT_LOCAL_DIR": str(tmp_path),
        }
    )
    assert result.returncode == 2
    assert f"Redis does not answer at 127.0.0.1:{closed} (IOT_REDIS_URL)" in result.stderr
    assert "redis-server" in result.stderr
    assert "IOT_LOCAL_BACKENDS=auto" in result.stderr
    assert "make up" in result.stderr
    assert "PostgreSQL" not in result.stderr


def test_make_run_in_embedded_mode_refuses_a_taken_port_or_a_remote_host(tmp_path: Path) -> None:
    with mosquitto() as mqtt_url:
        result = run_local_until_exit(
            {
                "IOT_LOCAL_BACKENDS": "embedded",
                "IOT_MQTT_URL": mqtt_url,
                "IOT_DATABASE_URL": "postgresql://postgres@db.example:5432/iot",
                "IOT_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
                "IOT_LOCAL_DIR": str(tmp_path),
            }
        )
    assert result.returncode == 2
    port = mqtt_url.rsplit(":", 1)[1]
    assert (
        f"port {port} of IOT_MQTT_URL is taken, so no embedded MQTT broker can listen there" in result.stderr
    )
    assert "an embedded one listens on this machine only" in result.stderr
    assert "Redis" not in result.stderr


def test_make_run_refuses_an_unknown_backend_mode(tmp_path: Path) -> None:
    result = run_local_until_exit({"IOT_LOCAL_BACKENDS": "docker", "IOT_LOCAL_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "IOT_LOCAL_BACKENDS must be one of auto, system, embedded, not 'docker'" in result.stderr


def test_make_run_stops_what_a_killed_run_left_and_refuses_to_share_its_directory_with_a_live_one(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    # Stands for a server a killed make run left running: an orphan, as its parent is gone.
    spawn = subprocess.run(
        ["sh", "-c", "sleep 120 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True, check=True
    )
    left = psutil.Process(int(spawn.stdout))
    try:

        def children_file(owner: int, started: float) -> None:
            entry = {"name": "redis", "pid": left.pid, "started": left.create_time()}
            (run_dir / "children.json").write_text(
                json.dumps({"owner": {"pid": owner, "started": started}, "children": [entry]})
            )

        children_file(os.getpid(), psutil.Process().create_time())
        closed = {"IOT_LOCAL_BACKENDS": "system", "IOT_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
        live_owner = run_local_until_exit({**closed, "IOT_LOCAL_DIR": str(tmp_path)})
        assert live_owner.returncode == 2
        assert f"another make run (pid {os.getpid()}) is using {tmp_path}" in live_owner.stderr
        assert left.is_running()

        children_file(dead.pid, 0.0)
        killed_owner = run_local_until_exit({**closed, "IOT_LOCAL_DIR": str(tmp_path)})
        stopped = f"stopped redis (pid {left.pid}: sleep 120), left running by an earlier run"
        assert stopped in killed_owner.stdout
        assert not left.is_running()
    finally:
        with contextlib.suppress(psutil.Error):
            left.kill()
