"""Running the platform's console scripts and private servers (Mosquitto, redis-server, PostgreSQL) as
processes."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import pytest

from iot_testkit.backends import MOSQUITTO_TEST_CONFIG, port_open
from iot_testkit.waiting import wait_until

BIN = Path(sys.executable).parent
JWT_SECRET = secrets.token_urlsafe(48)
"""``IOT_JWT_SECRET`` of every service a test or benchmark starts: random per run (there is no default)."""


_FIRST_PRIVATE_PORT = 10000
"""The ports :func:`free_port` picks from: here up to the ephemeral range."""
_handed_out: set[int] = set()
"""Ports :func:`free_port` has returned in this process: several are often picked before any is bound."""


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port that nothing is bound to right now, below the kernel's ephemeral range.

    Not one the kernel hands out for port 0: outgoing connections take their local ports from that
    range too, and one of them (to PostgreSQL, Redis, the broker, from any process) could take the port
    before the service started on it binds it ("address already in use", seen in ``make bench-e2e``).
    """
    low = _ephemeral_low()
    if low > _FIRST_PRIVATE_PORT + 1000:
        for _ in range(200):
            port = _FIRST_PRIVATE_PORT + secrets.randbelow(low - _FIRST_PRIVATE_PORT)
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("0.0.0.0", port))  # every address: the services bind them all
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        picked: int = s.getsockname()[1]
        return picked


def start_listening(
    args: Sequence[str],
    port: int,
    what: str,
    log: Path | None = None,
    timeout: float = 15.0,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``args`` (output to ``log``, or discarded; environment ``env``, or this one) and wait until
    something listens on ``port``; fail with the log's end if the process exits or ``timeout`` passes."""
    with log.open("ab") if log is not None else open(os.devnull, "wb") as out:
        proc = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT, env=env)

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}:\n{tail()}")
        return port_open("127.0.0.1", port)

    def tail() -> str:
        return log.read_text(errors="replace")[-4000:] if log is not None else ""

    try:
        wait_until(listening, timeout, f"{what} to listen on {port}", detail=tail)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


class ServiceProcess:
    """A console script of the platform, started with the given environment, logs kept in a file."""

    def __init__(
        self, script: str, env: Mapping[str, str], log_dir: Path, on_host: Sequence[str] = ()
    ) -> None:
        """``on_host`` prefixes the command (``ip netns exec NS`` for a host of :mod:`iot_testkit.netbed`)."""
        self.script = script
        self.on_host = list(on_host)
        self.env = {**os.environ, "IOT_LOG_FORMAT": "json", "IOT_JWT_SECRET": JWT_SECRET, **env}
        self.log_path = log_dir / f"{script}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServiceProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.on_host, str(BIN / self.script)], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def wait_http(self, url: str, timeout: float = 30.0, status: int = 200) -> None:
        """Wait until ``url`` answers ``status``; fail with the process log if it exits or times out."""

        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.script} exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                return httpx.get(url, timeout=1.0).status_code == status
            except httpx.HTTPError:
                return False

        wait_until(answers, timeout, f"{url} to answer {status}", interval=0.1, detail=self.logs)

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        """Wait until the log holds ``text``; fail with the log if the process exits first or time is up."""

        def logged() -> bool:
            assert self.proc is not None
            exited = self.proc.poll() is not None
            if text in self.log_path.read_text(errors="replace"):
                return True
            if exited:
                raise AssertionError(f"{self.script} exited with {self.proc.returncode}:\n{self.logs()}")
            return False

        wait_until(logged, timeout, f"{self.script} to log {text!r}", interval=0.05, detail=self.logs)

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit by itself; returns the exit code."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.script} still runs after {timeout}s:\n{self.logs()}") from None

    def log_lines(self) -> list[str]:
        """Every line the process wrote (stdout and stderr), in order."""
        return self.log_path.read_text(errors="replace").splitlines()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig`` and wait for the exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"{self.script} ignored {sig!r} for {timeout}s:\n{self.logs()}"
                ) from None
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]


Start = Callable[[str, Mapping[str, str]], ServiceProcess]
"""Starts a console script with extra environment (the e2e ``service`` fixture, or a benchmark's own)."""


@contextlib.contextmanager
def mosquitto_process(config: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``mosquitto -c config``, waited for until it listens on ``port``, terminated afterwards."""
    log = config.with_name("mosquitto.log")
    proc = start_listening(["mosquitto", "-c", str(config)], port, "mosquitto", log)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


class Broker:
    """A private Mosquitto on 127.0.0.1 with the tests' configuration (``max_queued_messages`` raised, never
    0), on a free port unless ``port`` is given; it can be stopped and started again on the same port.

    ``extra_config`` may name files in ``directory`` as ``{dir}`` (a temporary directory by default; a
    given one outlives the broker, so a test can start a new broker on the same state). With
    ``persistent``, a SIGTERMed broker saves its sessions and queued messages there and reloads them.
    """

    def __init__(
        self,
        extra_config: str = "",
        *,
        port: int | None = None,
        anonymous: bool = True,
        persistent: bool = False,
        directory: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="iot-mosquitto-")
            directory = Path(self._tmp.name)
        self.directory = directory
        config = MOSQUITTO_TEST_CONFIG.replace("listener 1883", f"listener {self.port} 127.0.0.1")
        if not anonymous:
            config = config.replace("allow_anonymous true", "allow_anonymous false")
        self.persistent = persistent
        if persistent:
            config = config.replace("persistence false", "persistence true")
            config += f"persistence_location {self.directory}/\nautosave_interval 1\n"
            if os.geteuid() == 0:
                # Started as root, mosquitto drops to the `mosquitto` user, which must be able to save its
                # database here (else it logs "Permission denied" on every save and restores nothing).
                shutil.chown(self.directory, "mosquitto", "mosquitto")
        self.config = self.directory / "mosquitto.conf"
        self.config.write_text(config + extra_config.replace("{dir}", str(self.directory)))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Broker:
        log = self.directory / "mosquitto.log"
        self.proc = start_listening(["mosquitto", "-c", str(self.config)], self.port, "mosquitto", log)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the broker with ``sig``. A persistent broker stopped with SIGTERM must have saved its
        database: a restart that restores nothing would lose the sessions under test."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
            if self.persistent and sig == signal.SIGTERM and not (self.directory / "mosquitto.db").exists():
                log = (self.directory / "mosquitto.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"Mosquitto saved no database in {self.directory}:\n{log}")

    def close(self) -> None:
        """Stop the broker and remove its temporary directory (a given ``directory`` is kept)."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


@contextlib.contextmanager
def mosquitto(
    extra_config: str = "", port: int | None = None, anonymous: bool = True, directory: Path | None = None
) -> Iterator[str]:
    """A private Mosquitto (see :class:`Broker`) for the duration of the block; yields its URL."""
    broker = Broker(extra_config, port=port, anonymous=anonymous, directory=directory)
    try:
        yield broker.start().url
    finally:
        broker.close()


DYNSEC_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
"""Debian's build of Mosquitto's dynamic security plugin."""


@contextlib.contextmanager
def dynsec_mosquitto(admin_password: str, prefix: str = "iot-dynsec-") -> Iterator[str]:
    """A private broker with the dynamic security plugin, no anonymous access and only the user ``admin``
    (``mosquitto_ctrl dynsec init``); yields its ``host:port``."""
    if not Path(DYNSEC_PLUGIN).exists():
        pytest.fail(f"{DYNSEC_PLUGIN} missing: install Debian's mosquitto package")
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    try:
        subprocess.run(
            ["mosquitto_ctrl", "dynsec", "init", str(folder / "dynsec.json"), "admin", admin_password],
            check=True,
            capture_output=True,
        )
        if os.geteuid() == 0:
            # Started as root, mosquitto drops to the `mosquitto` user, which must read and save this file.
            for path in (folder, folder / "dynsec.json"):
                shutil.chown(path, "mosquitto", "mosquitto")
        extra = f"plugin {DYNSEC_PLUGIN}\nplugin_opt_config_file {{dir}}/dynsec.json\n"
        with mosquitto(extra, anonymous=False, directory=folder) as url:
            yield url.removeprefix("mqtt://")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class RedisServer:
    """A private redis-server on a free port of 127.0.0.1, without persistence; it can be stopped (or
    killed) and started again on the same port, to take Redis away from a running service."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> RedisServer:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = start_listening(["redis-server", *args], self.port, "redis-server")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)


class PostgresServer:
    """A private PostgreSQL cluster (``initdb``) on a free port of 127.0.0.1, trust authentication, the
    server's default settings (``fsync`` and ``synchronous_commit`` on), from the machine's binaries
    (the newest ``/usr/lib/postgresql/*/bin``, else ``PATH``); as root, it runs as the ``postgres`` user.
    For the benchmarks: the CPU of its processes is the run's alone, not that of a server shared with
    other databases."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.directory = Path(tempfile.mkdtemp(prefix="iot-pg-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def bindir() -> Path | None:
        found = sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        )
        if found:
            return found[-1]
        initdb = shutil.which("initdb")
        return Path(initdb).parent if initdb else None

    def postmaster_pid(self) -> int:
        """The postmaster's pid (``postmaster.pid``; as root, it is a child of ``runuser``)."""
        return int((self.directory / "data" / "postmaster.pid").read_text().split()[0])

    def pids(self) -> list[int]:
        """Every process of the cluster now: the postmaster, its backends and auxiliary processes."""
        import psutil

        postmaster = self.postmaster_pid()
        with contextlib.suppress(psutil.Error):
            return [postmaster, *(c.pid for c in psutil.Process(postmaster).children(recursive=True))]
        return []

    def start(self) -> PostgresServer:
        bindir = self.bindir()
        if bindir is None:
            raise RuntimeError("no PostgreSQL binaries (initdb, postgres) on this machine")
        as_user: list[str] = []
        if os.geteuid() == 0:
            as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.directory, "postgres", "postgres")
        data = self.directory / "data"
        subprocess.run(
            [
                *as_user,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        args = ["-D", str(data), "-p", str(self.port), "-k", str(self.directory)]
        args += ["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"]
        self.proc = start_listening(
            [*as_user, str(bindir / "postgres"), *args], self.port, "postgres", self.directory / "log", 60
        )
        isready = [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        wait_until(lambda: subprocess.run(isready, check=False).returncode == 0, 60, "PostgreSQL ready")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                os.kill(self.postmaster_pid(), signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def private_redis() -> Iterator[RedisServer]:
    """A started :class:`RedisServer` for the duration of the block."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def redis7_binary(name: str) -> str:
    """The first ``name`` (``redis-server``, ``redis-cli``) on PATH of Redis 7 or later: sharded pub/sub
    needs 7, and a virtual environment may put an older embedded build first."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder) / name
        if not path.is_file() or not os.access(path, os.X_OK):
            continue
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10).stdout
        version = next(
            (w.split("=", 1)[-1] for w in out.split() if w[:1].isdigit() or w.startswith("v=")), ""
        )
        if version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 7:
            return str(path)
    raise RuntimeError(f"no {name} of Redis 7 or later on PATH")


class RedisClusterServer:
    """A private Redis Cluster of ``masters`` redis-server processes (cluster mode, no replicas, no
    persistence) on free ports of 127.0.0.1, its slots spread evenly by ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3) -> None:
        self.ports = [free_port() for _ in range(masters)]
        self.bus_ports = [free_port() for _ in range(masters)]
        """The cluster bus ports (by default port + 10000, which may be above 65535 or taken)."""
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)
        self.folder = Path(tempfile.mkdtemp(prefix="iot-redis-cluster-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> RedisClusterServer:
        for port, bus in zip(self.ports, self.bus_ports, strict=True):
            args = [
                *("--cluster-port", str(bus)),
                *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
                *(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(self.folder / f"nodes-{port}.conf"),
                ),
                *("--cluster-node-timeout", "2000", "--dir", str(self.folder)),
            ]
            log = self.folder / f"redis-{port}.log"
            self.procs.append(
                start_listening([redis7_binary("redis-server"), *args], port, "redis-server", log)
            )
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(
            [
                redis7_binary("redis-cli"),
                "--cluster",
                "create",
                *nodes,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_until(self._ready, 30, "the Redis Cluster to cover every slot")
        return self

    def _ready(self) -> bool:
        for port in self.ports:
            out = subprocess.run(
                [redis7_binary("redis-cli"), "-p", str(port), "cluster", "info"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            if "cluster_state:ok" not in out:
                return False
        return True

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def private_redis_cluster(masters: int = 3) -> Iterator[RedisClusterServer]:
    """A started :class:`RedisClusterServer` for the duration of the block."""
    server = RedisClusterServer(masters)
    try:
        yield server.start()
    finally:
        server.stop()
