"""The platform spread over hosts (:mod:`iot_testkit.netbed`), for the scale-out test (``make scale-test``,
tests/scale): a broker host (Mosquitto), a database host (a private PostgreSQL cluster of the machine's
binaries), a Redis host, three ingest hosts in one share group, two realtime hosts behind HAProxy (health
checks on ``/readyz``) on a load-balancer host, a publisher host and a WebSocket client host.

The faults are those of a fleet of hosts: an ingest host's cable pulled and put back (shorter and longer
than the MQTT session expiry), an ingest replica scaled in (SIGTERM), an ingest host that dies and never
comes back (kill -9), a realtime host killed while its clients are connected through the load balancer.
The checks after each are those of :class:`iot_testkit.chaos.Platform`.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import asyncpg
import gmqtt
from gmqtt.mqtt.constants import MQTTv50

from iot_testkit.chaos import Platform
from iot_testkit.fleet import ClientFleet
from iot_testkit.netbed import Host, NetBed
from iot_testkit.processes import PostgresServer, ServiceProcess
from iot_testkit.waiting import wait_for, wait_until

HOSTS = ("broker", "db", "redis", "ingest1", "ingest2", "ingest3", "rt1", "rt2", "lb", "pub", "ws")
INGESTS = ("ingest1", "ingest2", "ingest3")
REALTIMES = ("rt1", "rt2")
SESSION_EXPIRY_S = 30
"""The ingest replicas' MQTT session expiry in the bed: short, so that a cut can outlast it."""
PEER_DEAD_AFTER_S = 5.0

MOSQUITTO_CONFIG = """\
listener 1883 {address}
allow_anonymous true
persistence false
max_queued_messages 1000000
max_inflight_messages 0
"""

HAPROXY_CONFIG = """\
global
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
frontend realtime
    bind {address}:8001
    default_backend realtime
backend realtime
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
{servers}
"""


def postgres_bin() -> Path:
    """The machine's PostgreSQL binaries, found as :class:`PostgresServer` finds them."""
    bindir = PostgresServer.bindir()
    if bindir is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb, postgres) on this machine")
    return bindir


def missing_tools() -> str | None:
    """What the bed needs that the machine lacks (None when nothing)."""
    for tool in ("haproxy", "mosquitto", "redis-server", "runuser"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if PostgresServer.bindir() is None:
        return "needs PostgreSQL's server binaries (initdb, postgres)"
    return None


class Daemon:
    """A third-party server run on a host, its output in a log file."""

    def __init__(self, host: Host, argv: list[str], log: Path) -> None:
        self.host, self.argv, self.log = host, argv, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.host.command(self.argv), stdout=out, stderr=subprocess.STDOUT)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ScaleOut(Platform):
    """The platform on the hosts of a :class:`NetBed`; the checks and scenarios of :class:`Platform`."""

    def __init__(self, devices: list[str], tmp: Path, rate: float) -> None:
        self.bed = NetBed(HOSTS)
        super().__init__(
            self._service, f"postgresql://postgres@{self.bed['db'].address}:5432/iot", devices, tmp
        )
        self.rate = rate
        self.mqtt_url = f"mqtt://{self.bed['broker'].address}:1883"
        self.redis_url = f"redis://{self.bed['redis'].address}:6379/0"
        self.publisher_host = self.bed["pub"].command([])
        self.daemons: list[Daemon] = []
        self.services: dict[str, ServiceProcess] = {}
        # PostgreSQL runs as the postgres user, which cannot enter the test's private temporary folder.
        self.pgdata = Path(tempfile.mkdtemp(prefix="iot-scale-pg-"))
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def _service(self, script: str, env: Mapping[str, str], host: str | None = None) -> ServiceProcess:
        assert host is not None
        proc = ServiceProcess(script, env, self.logs, on_host=self.bed[host].command([])).start()
        self.services[host] = proc
        return proc

    def _daemon(self, host: str, argv: list[str]) -> Daemon:
        daemon = Daemon(self.bed[host], argv, self.logs / f"{host}-{argv[0].rsplit('/', 1)[-1]}.log").start()
        self.daemons.append(daemon)
        return daemon

    # -- start and stop ----------------------------------------------------------------------------------

    async def start(self, clients: int = 4) -> None:
        self.bed.up()
        await asyncio.to_thread(self._start_backends)
        conn = await asyncpg.connect(self.database_url)
        try:
            await conn.execute("INSERT INTO devices (id) SELECT unnest($1::text[])", self.devices)
        finally:
            await conn.close()
        for name in INGESTS:
            await self.start_ingest_on(name)
        for name in REALTIMES:
            await self.start_realtime_on(name)
        self._daemon("lb", ["haproxy", "-db", "-f", str(self._haproxy_config())])
        lb = self.bed["lb"].address
        await asyncio.to_thread(
            wait_until, lambda: self._http_ok(f"http://{lb}:8001/readyz"), 30, "HAProxy answering"
        )
        self.fleet = ClientFleet(8001, self.devices, clients, host=lb, netns=self.bed["ws"].namespace)
        await asyncio.to_thread(self.fleet.start)
        self.subscriptions = self.fleet.groups

    def _start_backends(self) -> None:
        db, broker, redis = self.bed["db"], self.bed["broker"], self.bed["redis"]
        pg = postgres_bin()
        shutil.chown(self.pgdata, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
        subprocess.run(
            [
                *as_postgres,
                str(pg / "initdb"),
                "-D",
                str(self.pgdata / "data"),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        # The bed's hosts (and the machine, at the gateway address) reach the database over the switch.
        with (self.pgdata / "data" / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {self.bed.gateway}/24 trust\n")
        self._daemon(
            "db",
            [
                *as_postgres,
                str(pg / "postgres"),
                "-D",
                str(self.pgdata / "data"),
                "-k",
                str(self.pgdata),
                "-h",
                db.address,
                "-p",
                "5432",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ],
        )
        wait_until(
            lambda: (
                subprocess.run(
                    db.command([str(pg / "pg_isready"), "-h", db.address, "-p", "5432"]), capture_output=True
                ).returncode
                == 0
            ),
            30,
            "PostgreSQL on the database host",
        )
        created = subprocess.run(
            db.command([*as_postgres, str(pg / "createdb"), "-h", db.address, "-U", "postgres", "iot"]),
            capture_output=True,
            text=True,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"createdb on the database host failed: {created.stderr}")
        config = self.tmp / "mosquitto.conf"
        config.write_text(MOSQUITTO_CONFIG.format(address=broker.address))
        self._daemon("broker", ["mosquitto", "-c", str(config)])
        self._daemon(
            "redis",
            [
                "redis-server",
                "--bind",
                redis.address,
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
        )
        migrate = ServiceProcess(
            "iot-migrate",
            {"IOT_DATABASE_URL": self.database_url},
            self.logs,
            on_host=self.bed["ingest1"].command([]),
        ).start()
        assert migrate.wait_exit(120) == 0, migrate.logs()

    def _haproxy_config(self) -> Path:
        servers = "\n".join(f"    server {name} {self.bed[name].address}:8001 check" for name in REALTIMES)
        path = self.tmp / "haproxy.cfg"
        path.write_text(HAPROXY_CONFIG.format(address=self.bed["lb"].address, servers=servers))
        return path

    @staticmethod
    def _http_ok(url: str) -> bool:
        import httpx

        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    async def start_ingest_on(self, name: str) -> None:
        env = {
            "IOT_DATABASE_URL": self.database_url,
            "IOT_REDIS_URL": self.redis_url,
            "IOT_MQTT_URL": self.mqtt_url,
            "IOT_MQTT_SHARE_GROUP": "scale",
            "IOT_MQTT_CLIENT_ID": f"ingest-{name}",
            "IOT_MQTT_SESSION_EXPIRY_S": str(SESSION_EXPIRY_S),
            "IOT_INGEST_HEARTBEAT_S": "1",
            "IOT_INGEST_PEER_DEAD_AFTER_S": str(PEER_DEAD_AFTER_S),
            "IOT_INGEST_HTTP_PORT": "8002",
            "IOT_DATABASE_POOL_MIN": "1",
            "IOT_DATABASE_POOL_MAX": "4",
            "IOT_LOG_LEVEL": "info",
        }
        proc = self._service("iot-ingest", env, name)
        url = f"http://{self.bed[name].address}:8002/readyz"
        await asyncio.to_thread(proc.wait_http, url, 60)

    async def start_realtime_on(self, name: str) -> None:
        env = {
            "IOT_DATABASE_URL": self.database_url,
            "IOT_REDIS_URL": self.redis_url,
            "IOT_REALTIME_PORT": "8001",
            "IOT_DATABASE_POOL_MIN": "1",
            "IOT_DATABASE_POOL_MAX": "2",
            "IOT_LOG_LEVEL": "info",
        }
        proc = self._service("iot-realtime", env, name)
        await asyncio.to_thread(proc.wait_http, f"http://{self.bed[name].address}:8001/readyz", 60)

    async def stop(self) -> None:
        try:
            await self._stop_processes()
        finally:
            self.bed.down()
            shutil.rmtree(self.pgdata, ignore_errors=True)

    async def _stop_processes(self) -> None:
        if self.fleet is not None:
            await asyncio.to_thread(self.fleet.stop)
        for proc in self.services.values():
            if proc.proc is not None and proc.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.proc.send_signal(signal.SIGCONT)
                proc.proc.kill()
                proc.proc.wait()
        for daemon in reversed(self.daemons):
            daemon.stop()

    # -- the faults --------------------------------------------------------------------------------------

    def cut_ingest(self, name: str, seconds: float) -> Callable[[], Awaitable[float]]:
        async def fault() -> float:
            self.bed.cut(name)
            await asyncio.sleep(seconds)
            self.bed.restore(name)
            return time.time()

        return fault

    def scale_in(self, name: str) -> Callable[[], Awaitable[float]]:
        async def fault() -> float:
            proc = self.services[name]
            code = await asyncio.to_thread(proc.stop)
            if code != 0:
                raise AssertionError(f"{name} exited with {code} on SIGTERM:\n{proc.logs()}")
            return time.time()

        return fault

    def kill_ingest_for_good(self, name: str) -> Callable[[], Awaitable[float]]:
        async def fault() -> float:
            proc = self.services[name]
            proc.kill()
            # Repaired once a peer has emptied its session (what the broker had queued for it is stored).
            adopter_logs = [self.services[n] for n in INGESTS if n != name]
            await wait_for(
                lambda: any(
                    f'"peer":"ingest-{name}"' in line and '"outcome":"emptied"' in line
                    for p in adopter_logs
                    for line in p.log_lines()
                ),
                60,
                f"a peer adopting the session of {name}",
                interval=0.5,
            )
            return time.time()

        return fault

    def kill_realtime_host(self, name: str) -> Callable[[], Awaitable[float]]:
        async def fault() -> float:
            assert self.fleet is not None
            self.services[name].kill()
            repaired = time.time()
            # The clients of the dead host reconnect through the load balancer to the other one.
            before = self.fleet.subscribed()
            await asyncio.to_thread(self.fleet.wait_subscribed, before + 1, 30)
            return repaired

        return fault

    async def session_present(self, client_id: str) -> bool:
        """Whether the broker holds a session for ``client_id`` (clean start off, expiry 0: a session
        found is discarded when this probe disconnects, after it was counted)."""
        client = gmqtt.Client(client_id, clean_session=False, session_expiry_interval=0)
        flags: list[bool] = []
        client.on_connect = lambda _c, f, _rc, _p: flags.append(bool(f))
        await client.connect(self.bed["broker"].address, 1883, version=MQTTv50)
        await wait_for(lambda: bool(flags), 10, "CONNACK")
        await client.disconnect()
        return flags[0]
