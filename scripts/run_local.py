"""``make run``: the whole platform on this machine, with a small simulated fleet, until Ctrl-C.

It finds PostgreSQL, Redis and the MQTT broker, starting an embedded one for each that does not answer
(``IOT_LOCAL_BACKENDS``, see local_backends.py and docs/configuration.md), applies the schema, starts the
three services bound to 127.0.0.1, waits until each is ready, seeds a demo alert rule, starts the simulator,
prints the URLs and what it turned on for convenience, and interleaves every log line prefixed with its
process. Ctrl-C or SIGTERM stops the simulator and the services, then the embedded servers, and waits for
each; every child also gets the parent-death signal (Linux), and what a killed run left running is stopped
on the next start.

Everything is configured by the usual ``IOT_*`` variables (docs/configuration.md), plus
``IOT_LOCAL_BACKENDS`` (auto, system, embedded), ``IOT_LOCAL_DIR`` (the embedded servers' data, default
``.local/``), ``IOT_SIM_DEVICES`` (default 5), ``IOT_SIM_RATE`` (readings per second per device, default 1)
and ``IOT_SIM_PREFIX`` (device id prefix, default ``sim``). For this local run the API bootstraps an admin
(``IOT_BOOTSTRAP_ADMIN_EMAIL``, default admin@example.com, and ``IOT_BOOTSTRAP_ADMIN_PASSWORD``) and an
API key (``IOT_BOOTSTRAP_API_KEY``) the simulator registers its devices with.

There is no default secret: unless set in the environment, ``IOT_JWT_SECRET``, the admin password and the
bootstrap API key are generated at random on the first run and kept in ``.run-local.env`` at the repository
root (git-ignored, mode 0600; another file with ``IOT_RUN_SECRETS_FILE``), so tokens, the printed login and
the key stay valid across runs. Every other API key named ``bootstrap`` (those earlier versions of make run
created on each run) is revoked once the API is up. Delete the file to get new ones (the admin keeps the
password it was created with).
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from iot_common.logging import use_colours
from iot_sim.demo import DEMO_RULE_NAME, ApiRefused, seed_demo_rule

sys.path.insert(0, str(Path(__file__).resolve().parent))

import local_backends as lb

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("IOT_JWT_SECRET", "IOT_BOOTSTRAP_ADMIN_PASSWORD", "IOT_BOOTSTRAP_API_KEY")
COLOURS = {
    "api": "\033[36m",
    "realtime": "\033[35m",
    "ingest": "\033[33m",
    "sim": "\033[32m",
    "postgres": "\033[34m",
    "redis": "\033[31m",
    "mqtt": "\033[94m",
}
RESET = "\033[0m"
COLOURED = use_colours(sys.stdout)
"""Process-name prefixes in colour only on a terminal (``NO_COLOR``, ``FORCE_COLOR`` as for the services)."""
SERVICES = ("api", "realtime", "ingest")


def generated_value(name: str) -> str:
    if name == "IOT_BOOTSTRAP_API_KEY":
        return f"iotk_{secrets.token_hex(6)}_{secrets.token_urlsafe(24)}"
    return secrets.token_urlsafe(48 if name == "IOT_JWT_SECRET" else 18)


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
            saved[name] = generated_value(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("# Secrets of `make run` (scripts/run_local.py), generated at random. Never commit.\n")
            out.writelines(f"{name}={value}\n" for name, value in saved.items())
        print(f"make run: generated {', '.join(missing)} into {path}", flush=True)
    return {name: value for name, value in saved.items() if not env.get(name)}


def http_json(method: str, url: str, api_key: str, body: object = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"X-API-Key": api_key, "Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read()
        return json.loads(text) if text else None


def revoke_earlier_bootstrap_keys(api: str, api_key: str) -> int:
    """Revoke every key named ``bootstrap`` but this run's: earlier make runs created one per run."""
    keys = http_json("GET", f"{api}/api/v1/api-keys/", api_key)["items"]
    prefix = api_key.split("_")[1]
    stale = [
        k for k in keys if k["name"] == "bootstrap" and not k.get("revoked_at") and k["prefix"] != prefix
    ]
    for key in stale:
        http_json("DELETE", f"{api}/api/v1/api-keys/{key['id']}", api_key)
    return len(stale)


class Supervisor:
    """Runs processes with prefixed, interleaved output and stops them all together."""

    def __init__(self, leftovers: lb.Leftovers) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stop_signals: dict[str, int] = {}
        self.backends: list[str] = []
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.leftovers = leftovers

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        *,
        backend: bool = False,
        stop_signal: int = signal.SIGTERM,
        user: str | None = None,
        stdin_pipe: bool = False,
    ) -> subprocess.Popen[bytes]:
        # Backends get their own session: a Ctrl-C in the terminal reaches run_local and the services only,
        # and the backends are stopped once the services have flushed into them.
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=backend,
            preexec_fn=lb.die_with_parent(stop_signal),  # run_local has no other thread
            **lb.as_user(user),
        )
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        self.selector.register(proc.stdout, selectors.EVENT_READ, name)
        self.procs[name] = proc
        self.stop_signals[name] = stop_signal
        if backend:
            self.backends.append(name)
        self.leftovers.record(name, proc.pid, stop_signal)
        return proc

    def pump(self, timeout: float) -> None:
        """Copy whatever the processes printed, each line prefixed with its name."""
        for key, _ in self.selector.select(timeout):
            stream = key.fileobj
            data = stream.read()  # type: ignore[union-attr]
            if not data:
                self.selector.unregister(stream)
                continue
            colour, reset = (COLOURS.get(key.data, ""), RESET) if COLOURED else ("", "")
            for line in data.decode(errors="replace").splitlines():
                sys.stdout.write(f"{colour}{key.data:<8}{reset} | {line}\n")
            sys.stdout.flush()

    def stop(self, *_: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        for name, proc in self.procs.items():
            if name not in self.backends and proc.poll() is None:
                proc.send_signal(self.stop_signals[name])

    def wait_for(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(self.procs[n].poll() is None for n in names) and time.monotonic() < deadline:
            self.pump(0.2)
        for name in names:
            if self.procs[name].poll() is None:
                print(f"make run: {name} did not stop within {timeout:.0f} s; killing it", file=sys.stderr)
                self.procs[name].kill()

    def wait(self) -> dict[str, int]:
        """Wait for the services and the simulator, then stop the backends and wait for them."""
        self.wait_for([n for n in self.procs if n not in self.backends], 60)
        for name in self.backends:
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(self.stop_signals[name])
        self.wait_for(self.backends, 30)
        self.pump(0)
        codes = {name: proc.wait() for name, proc in self.procs.items()}
        self.leftovers.release()
        return codes

    def wait_until(self, name: str, ready: Callable[[], bool], timeout: float = 60.0) -> bool:
        """Pump output until ``ready()``; False when the process exits, the run stops, or on timeout."""
        deadline = time.monotonic() + timeout
        proc = self.procs[name]
        while not self.stopping and time.monotonic() < deadline:
            if ready():
                return True
            if proc.poll() is not None:
                return False
            self.pump(0.1)
        return False


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.HTTPError):
            return False

    return check


def banner(
    env: dict[str, str],
    ports: dict[str, str],
    choices: list[lb.Choice],
    notes: dict[str, str],
    local: Path,
    rule: str,
) -> str:
    api = f"http://127.0.0.1:{ports['api']}"
    lines = [
        "",
        "IoT platform running, for local use only. Ctrl-C stops everything.",
        f"  API docs     {api}/api/docs",
        f"  Dashboard    {api}/dashboard/",
        f"  WebSocket    ws://127.0.0.1:{ports['realtime']}/ws",
        f"  Metrics      http://127.0.0.1:{ports['ingest']}/metrics",
        f"  Login        {env['IOT_BOOTSTRAP_ADMIN_EMAIL']} / {env['IOT_BOOTSTRAP_ADMIN_PASSWORD']}",
        f"  API key      {env['IOT_BOOTSTRAP_API_KEY']}",
        "Backends (IOT_LOCAL_BACKENDS=" + env.get("IOT_LOCAL_BACKENDS", "auto") + "):",
    ]
    for c in choices:
        how = f"embedded  {notes[c.kind.key]}" if c.embedded else "system"
        lines.append(f"  {c.kind.name:<12} {c.url.split('@')[-1].split('//')[-1]:<22} {how}")
    if any(c.embedded for c in choices):
        lines += [
            "  The embedded servers are for local use only: 127.0.0.1, no password, no TLS.",
            f"  Their data is in {local} (`make clean-local` deletes it). For real servers start them,",
            "  point IOT_DATABASE_URL, IOT_REDIS_URL and IOT_MQTT_URL at them and set",
            "  IOT_LOCAL_BACKENDS=system, or run the platform in Docker with `make up` (docs/deploy.md).",
        ]
    lines += [
        "Turned on for convenience by make run (never do this in production):",
        "  - IOT_INGEST_AUTO_REGISTER=true: a message on an unknown device id creates that device",
        *(
            ["  - an open broker: the services connect without an MQTT user, as can any client reaching it"]
            if not urlsplit(env.get("IOT_MQTT_URL") or "mqtt://").username
            else []
        ),
        "  - demo credentials: the admin login and an admin API key above, kept in "
        + env.get("IOT_RUN_SECRETS_FILE", ".run-local.env"),
        f"  - a demo alert rule ({rule}): '{DEMO_RULE_NAME}'",
        "  - every service listens on 127.0.0.1 only (IOT_BIND_HOST)",
        "",
    ]
    return "\n".join(lines)


def _embedded(choices: list[lb.Choice], key: str) -> bool:
    return any(c.embedded and c.kind.key == key for c in choices)


def start_backends(
    sup: Supervisor, choices: list[lb.Choice], local: Path, env: dict[str, str]
) -> dict[str, str] | None:
    """Start the embedded servers and wait for each; their notes by key, or None when one failed."""
    notes: dict[str, str] = {}
    backend_env = {k: v for k, v in env.items() if not k.startswith("IOT_")}
    for choice in choices:
        if not choice.embedded:
            continue
        started = time.monotonic()
        try:
            server = lb.BUILDERS[choice.kind.key](choice, local)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            print(f"make run: cannot prepare the embedded {choice.kind.name}: {exc}", file=sys.stderr)
            return None
        sup.start(
            server.name,
            server.argv,
            backend_env,
            backend=True,
            stop_signal=server.stop_signal,
            user=server.user,
            stdin_pipe=server.stdin_pipe,
        )
        if not sup.wait_until(server.name, server.ready, timeout=60):
            if not sup.stopping:
                print(f"make run: the embedded {choice.kind.name} did not start (see above)", file=sys.stderr)
            return None
        if choice.kind.key == "postgres":
            lb.ensure_database(choice)
        notes[choice.kind.key] = server.note
        print(
            f"make run: embedded {choice.kind.name} ready on {choice.host}:{choice.port} "
            f"in {time.monotonic() - started:.1f} s ({server.note})",
            flush=True,
        )
    return notes


def main() -> int:
    env = dict(os.environ)
    mode = env.setdefault("IOT_LOCAL_BACKENDS", "auto")
    if mode not in lb.MODES:
        allowed = ", ".join(lb.MODES)
        print(f"make run: IOT_LOCAL_BACKENDS must be one of {allowed}, not {mode!r}", file=sys.stderr)
        return 2
    local = Path(env.get("IOT_LOCAL_DIR") or ROOT / ".local").resolve()
    leftovers = lb.Leftovers(local / "run")
    owner = leftovers.previous_owner()
    if owner is not None:
        print(f"make run: another make run (pid {owner}) is using {local}; stop it first", file=sys.stderr)
        return 2
    for line in leftovers.clean():
        print(f"make run: stopped {line}, left running by an earlier run that was killed", flush=True)
    leftovers.own()

    env.setdefault("IOT_LOG_FORMAT", "console")
    env.setdefault("IOT_INGEST_AUTO_REGISTER", "true")
    env.setdefault("IOT_BOOTSTRAP_ADMIN_EMAIL", "admin@example.com")
    env.setdefault("IOT_BIND_HOST", "127.0.0.1")
    ports = {
        "api": env.setdefault("IOT_API_PORT", "8000"),
        "realtime": env.setdefault("IOT_REALTIME_PORT", "8001"),
        "ingest": env.setdefault("IOT_INGEST_HTTP_PORT", "8002"),
    }
    # The dashboard is served by the API and talks to realtime on its own port.
    realtime_url = f"ws://127.0.0.1:{ports['realtime']}"
    env.setdefault("IOT_PUBLIC_REALTIME_URL", realtime_url)
    env.setdefault("IOT_DASHBOARD_CONNECT_SRC", f"{realtime_url},ws://localhost:{ports['realtime']}")
    env.setdefault("IOT_CORS_ORIGINS", f"http://127.0.0.1:{ports['api']},http://localhost:{ports['api']}")

    choices, problems = lb.choose(env, mode)
    problems += lb.missing_packages(choices)
    if problems:
        leftovers.release()
        print("make run: cannot start:\n" + "\n".join(f"- {p}" for p in problems), file=sys.stderr)
        return 2
    secrets_file = Path(env.get("IOT_RUN_SECRETS_FILE") or ROOT / ".run-local.env")
    env["IOT_RUN_SECRETS_FILE"] = str(secrets_file)
    env.update(local_secrets(secrets_file, env))
    if _embedded(choices, "mqtt"):
        if env.get("IOT_MQTT_SHARE_GROUP"):
            print(f"make run: IOT_MQTT_SHARE_GROUP={env['IOT_MQTT_SHARE_GROUP']} ignored:", end=" ")
        print(
            "the embedded broker has no shared subscriptions, so ingest subscribes without $share "
            "as one process (IOT_MQTT_SHARE_GROUP empty)",
            flush=True,
        )
        env["IOT_MQTT_SHARE_GROUP"] = ""

    sup = Supervisor(leftovers)
    signal.signal(signal.SIGINT, sup.stop)
    signal.signal(signal.SIGTERM, sup.stop)
    notes = start_backends(sup, choices, local, env)
    if notes is not None and not sup.stopping:
        migrate = subprocess.run([str(BIN / "iot-migrate")], env=env, check=False)
        if migrate.returncode != 0:
            print("make run: iot-migrate failed (see above)", file=sys.stderr)
            notes = None
    if notes is None or sup.stopping:
        interrupted = sup.stopping and notes is not None
        sup.stop()
        sup.wait()
        return 0 if interrupted else 1

    for name in SERVICES:
        sup.start(name, [str(BIN / f"iot-{name}")], env)
    for name in SERVICES:
        url = f"http://127.0.0.1:{ports[name]}/readyz"
        if not sup.wait_until(name, http_ok(url)) and not sup.stopping:
            print(f"make run: {name} did not become ready on port {ports[name]}", file=sys.stderr)
            sup.stop()
    api = f"http://127.0.0.1:{ports['api']}"
    api_key = env["IOT_BOOTSTRAP_API_KEY"]
    rule = "not seeded"
    if not sup.stopping:
        try:
            revoked = revoke_earlier_bootstrap_keys(api, api_key)
            if revoked:
                print(f"make run: revoked {revoked} API key(s) named 'bootstrap' of earlier runs", flush=True)
            # >>> Demo data: the one place it is seeded, once the API is ready (idempotent on every run).
            rule = "created" if seed_demo_rule(api, api_key)[1] else "kept"
        except (OSError, KeyError, ValueError, ApiRefused, httpx.HTTPError) as exc:
            print(f"make run: could not set up the demo data through the API: {exc}", file=sys.stderr)
    if not sup.stopping:
        sim_env = {**env, "IOT_SIM_API_URL": api, "IOT_SIM_API_KEY": api_key}
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
                "--spike-probability",
                env.get("IOT_SIM_SPIKE_PROBABILITY", "0.01"),
                "--will",
                "--quiet",
            ],
            sim_env,
        )
        print(banner(env, ports, choices, notes, local, rule), flush=True)
    while not sup.stopping:
        sup.pump(0.5)
        exited = [n for n, p in sup.procs.items() if p.poll() is not None and n != "sim"]
        if exited:
            print(f"make run: {', '.join(exited)} exited; stopping the rest", file=sys.stderr)
            sup.stop()
    codes = sup.wait()
    stopped = (0, -signal.SIGTERM, -signal.SIGINT)
    failed = {n: c for n, c in codes.items() if c not in stopped}
    print(f"make run: stopped ({', '.join(f'{n}={c}' for n, c in codes.items())})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
