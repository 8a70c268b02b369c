"""``make run``: the whole platform on this machine, with a small simulated fleet, until Ctrl-C.

It checks that PostgreSQL, Redis and the MQTT broker answer (and says how to start the one that does
not), applies the schema, starts the three services, waits until each is ready, starts the simulator,
prints the URLs, and interleaves every log line prefixed with its process. Ctrl-C or SIGTERM stops every
process with SIGTERM and waits for each.

Everything is configured by the usual ``IOT_*`` variables (docs/configuration.md), plus
``IOT_SIM_DEVICES`` (default 5), ``IOT_SIM_RATE`` (readings per second per device, default 1) and
``IOT_SIM_PREFIX`` (device id prefix, default ``sim``). For this local run the API bootstraps an admin
(``IOT_BOOTSTRAP_ADMIN_EMAIL``, default admin@example.com, and ``IOT_BOOTSTRAP_ADMIN_PASSWORD``) and an
API key the simulator registers its devices with.

There is no default secret: unless set in the environment, ``IOT_JWT_SECRET`` and the admin password are
generated at random on the first run and kept in ``.run-local.env`` at the repository root (git-ignored,
mode 0600; another file with ``IOT_RUN_SECRETS_FILE``), so tokens and the printed login stay valid across
runs. Delete the file to get new ones (the admin keeps the password it was created with).
"""

from __future__ import annotations

import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("IOT_JWT_SECRET", "IOT_BOOTSTRAP_ADMIN_PASSWORD")
COLOURS = {"api": "\033[36m", "realtime": "\033[35m", "ingest": "\033[33m", "sim": "\033[32m"}
RESET = "\033[0m"
HOW_TO_START = {
    "PostgreSQL": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "Redis": "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save ''",
    "MQTT broker": "mosquitto -d -c /etc/mosquitto/mosquitto.conf",
}


def answers(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), 2):
            return True
    except OSError:
        return False


def check_backends(env: dict[str, str]) -> list[str]:
    """A line per backing service that does not answer, saying how to start it."""
    problems = []
    for name, var, default, port in (
        ("PostgreSQL", "IOT_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres", 5432),
        ("Redis", "IOT_REDIS_URL", "redis://127.0.0.1:6379/0", 6379),
        ("MQTT broker", "IOT_MQTT_URL", "mqtt://127.0.0.1:1883", 1883),
    ):
        url = env.get(var, default)
        if not answers(url, port):
            host = urlsplit(url).netloc.rpartition("@")[2]
            problems.append(
                f"{name} does not answer at {host} ({var}). Start it with:\n    {HOW_TO_START[name]}\n"
                "  or run the whole platform in Docker with `make up`."
            )
    return problems


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def local_secrets(path: Path, env: dict[str, str]) -> dict[str, str]:
    """The secrets of :data:`GENERATED` not set in ``env``: read from ``path``, else generated and saved."""
    saved: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and name.strip() in GENERATED and value.strip():
                saved[name.strip()] = value.strip()
    missing = [name for name in GENERATED if not env.get(name) and name not in saved]
    if missing:
        for name in missing:
            saved[name] = secrets.token_urlsafe(48 if name == "IOT_JWT_SECRET" else 18)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("# Secrets of `make run` (scripts/run_local.py), generated at random. Never commit.\n")
            out.writelines(f"{name}={value}\n" for name, value in saved.items())
        print(f"make run: generated {', '.join(missing)} into {path}", flush=True)
    return {name: value for name, value in saved.items() if not env.get(name)}


class Supervisor:
    """Runs processes with prefixed, interleaved output and stops them all together."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.selector = selectors.DefaultSelector()
        self.stopping = False

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        self.selector.register(proc.stdout, selectors.EVENT_READ, name)
        self.procs[name] = proc
        return proc

    def pump(self, timeout: float) -> None:
        """Copy whatever the processes printed, each line prefixed with its name."""
        for key, _ in self.selector.select(timeout):
            stream = key.fileobj
            data = stream.read()  # type: ignore[union-attr]
            if not data:
                self.selector.unregister(stream)
                continue
            colour = COLOURS.get(key.data, "")
            for line in data.decode(errors="replace").splitlines():
                sys.stdout.write(f"{colour}{key.data:<8}{RESET} | {line}\n")
            sys.stdout.flush()

    def stop(self, *_: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def wait(self) -> dict[str, int]:
        deadline = time.monotonic() + 60
        while any(p.poll() is None for p in self.procs.values()) and time.monotonic() < deadline:
            self.pump(0.2)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        self.pump(0)
        return {name: proc.wait() for name, proc in self.procs.items()}


def main() -> int:
    env = dict(os.environ)
    env.setdefault("IOT_LOG_FORMAT", "console")
    env.setdefault("IOT_INGEST_AUTO_REGISTER", "true")
    env.setdefault("IOT_BOOTSTRAP_ADMIN_EMAIL", "admin@example.com")
    api_key = env.setdefault(
        "IOT_BOOTSTRAP_API_KEY", f"iotk_{secrets.token_hex(6)}_{secrets.token_urlsafe(24)}"
    )
    problems = check_backends(env)
    if problems:
        print("make run: cannot start:\n" + "\n".join(f"- {p}" for p in problems), file=sys.stderr)
        return 2
    env.update(local_secrets(Path(env.get("IOT_RUN_SECRETS_FILE") or ROOT / ".run-local.env"), env))
    if subprocess.run([str(BIN / "iot-migrate")], env=env, check=False).returncode != 0:
        print("make run: iot-migrate failed (see above)", file=sys.stderr)
        return 1
    ports = {
        "api": env.get("IOT_API_PORT", "8000"),
        "realtime": env.get("IOT_REALTIME_PORT", "8001"),
        "ingest": env.get("IOT_INGEST_HTTP_PORT", "8002"),
    }
    env.setdefault("IOT_PUBLIC_REALTIME_URL", f"ws://127.0.0.1:{ports['realtime']}/ws")  # for the dashboard
    sup = Supervisor()
    signal.signal(signal.SIGINT, sup.stop)
    signal.signal(signal.SIGTERM, sup.stop)
    for name in ("api", "realtime", "ingest"):
        sup.start(name, [str(BIN / f"iot-{name}")], env)
    for name, port in ports.items():
        deadline = time.monotonic() + 60
        while not sup.stopping and time.monotonic() < deadline:
            sup.pump(0.1)
            if wait_ready(f"http://127.0.0.1:{port}/readyz", sup.procs[name], timeout=0.5):
                break
        else:
            if not sup.stopping:
                print(f"make run: {name} did not become ready on port {port}", file=sys.stderr)
                sup.stop()
    if not sup.stopping:
        sim_env = {**env, "IOT_SIM_API_URL": f"http://127.0.0.1:{ports['api']}", "IOT_SIM_API_KEY": api_key}
        sup.start(
            "sim",
            [
                str(BIN / "iot-sim"),
                "--devices",
                env.get("IOT_SIM_DEVICES", "5"),
                "--rate",
                env.get("IOT_SIM_RATE", "1"),
                "--prefix",
                env.get("IOT_SIM_PREFIX", "sim"),
                "--will",
                "--quiet",
            ],
            sim_env,
        )
        print(
            "\n".join(
                [
                    "",
                    "IoT platform running. Ctrl-C stops everything.",
                    f"  API docs     http://127.0.0.1:{ports['api']}/api/docs",
                    f"  Dashboard    http://127.0.0.1:{ports['api']}/dashboard",
                    f"  WebSocket    ws://127.0.0.1:{ports['realtime']}/ws",
                    f"  Metrics      http://127.0.0.1:{ports['ingest']}/metrics",
                    f"  Login        {env['IOT_BOOTSTRAP_ADMIN_EMAIL']} "
                    f"/ {env['IOT_BOOTSTRAP_ADMIN_PASSWORD']}",
                    f"  API key      {api_key}",
                    "",
                ]
            ),
            flush=True,
        )
    while not sup.stopping:
        sup.pump(0.5)
        exited = [n for n, p in sup.procs.items() if p.poll() is not None and n != "sim"]
        if exited:
            print(f"make run: {', '.join(exited)} exited; stopping the rest", file=sys.stderr)
            sup.stop()
    codes = sup.wait()
    failed = {n: c for n, c in codes.items() if c not in (0, -signal.SIGTERM)}
    print(f"make run: stopped ({', '.join(f'{n}={c}' for n, c in codes.items())})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
