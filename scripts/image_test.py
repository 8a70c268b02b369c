"""Build the platform's image and run deploy/compose.yml for real, on a private Docker engine.

    uv run --frozen python scripts/image_test.py      (make image-test; as root)

Steps, each timed and reported:

1. A private ``dockerd`` (its data root, exec root and socket under a temporary folder; no default bridge,
   no iptables rules, so the host's networking is left alone), stopped and removed at the end.
2. The base images: no registry is reachable, so ``debootstrap --variant=minbase`` makes a Debian bookworm
   root file system, ``docker import`` turns it into ``iot-local/debian:bookworm``, and the Dockerfiles in
   tests/image/bases/ add Python 3.11, Node.js, PostgreSQL, Redis and Mosquitto from Debian's packages.
   They are saved (``docker save``) under ``IOT_IMAGE_CACHE`` (/var/cache/iot-image-test), keyed by the
   Debian package versions and those Dockerfiles, and loaded from there by later runs. The Python and Node.js
   ones are tagged ``python:3.11-slim`` and ``node:20-slim``, the names the shipped Dockerfile uses.
3. The project image, from the shipped Dockerfile, unchanged: ``docker build -t iot-platform:latest .``,
   then checked: user 10001, no compiler, no uv/npm/node, no development dependency.
4. ``docker-compose`` (Compose v1, the one available here; the file is also valid for v2) brings up
   deploy/compose.yml with tests/image/compose.local.yml, which swaps only the third-party images
   (PostgreSQL, Redis, Mosquitto) for the local ones; ports are published on free ports of 127.0.0.1.
5. A smoke test through the published ports: the migrate job completed, every container healthy and every
   platform service non-root, ``/readyz`` of each service, a device registered, its MQTT reading stored
   and seen over the WebSocket, the dashboard served; then ``docker-compose down -v`` leaves nothing.

On failure the logs of every container (and of dockerd and the builds) are kept in
``artifacts/image-test/`` (``--artifacts``). Exit status 0 on success, 1 on a failed check, 3 when this
machine cannot run it (not root, no dockerd): the message says why.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASES = ROOT / "tests" / "image" / "bases"
OVERRIDE = ROOT / "tests" / "image" / "compose.local.yml"
COMPOSE_FILE = ROOT / "deploy" / "compose.yml"
DEFAULT_CACHE = Path(os.environ.get("IOT_IMAGE_CACHE", "/var/cache/iot-image-test"))
MIRROR = os.environ.get("IOT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get("IOT_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
SUITE = "bookworm"
BASE_TAG = "iot-local/debian:bookworm"
# Local base image -> (Dockerfile in tests/image/bases, the names it is also tagged as).
LOCAL_IMAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "iot-local/python": ("python.Dockerfile", ("python:3.11-slim",)),
    "iot-local/node": ("node.Dockerfile", ("node:20-slim",)),
    "iot-local/postgres": ("postgres.Dockerfile", ()),
    "iot-local/redis": ("redis.Dockerfile", ()),
    "iot-local/mosquitto": ("mosquitto.Dockerfile", ()),
}
# The Debian packages whose versions key the cache of base images.
KEY_PACKAGES = (
    "python3",
    "python3-pip",
    "nodejs",
    "npm",
    "postgresql",
    "redis-server",
    "mosquitto",
    "mosquitto-clients",
    "ca-certificates",
)
TOOLS = {"dockerd": "docker.io", "docker": "docker.io", "docker-compose": "docker-compose"}
TOOLS_ROOT = {"debootstrap": "debootstrap"}
PROJECT_IMAGE = "iot-platform:latest"
PLATFORM_SERVICES = ("api", "realtime", "ingest")
HEALTHY_SERVICES = ("postgres", "redis", "mosquitto", "api", "realtime", "ingest")
DEVICE = "image-smoke-1"
# Packages of the development group that must not be in the image (tools and test libraries).
DEV_MODULES = (
    "pytest", "mypy", "ruff", "playwright", "hypothesis", "schemathesis", "testcontainers", "iot_testkit",
)  # fmt: skip
BUILD_TOOLS = ("gcc", "cc", "c++", "make", "uv", "npm", "node", "git")


class Unavailable(Exception):
    """This machine cannot run the test (not root, no Docker engine): a reason, not a failure."""


class CheckFailed(AssertionError):
    """One of the smoke test's assertions failed."""


def log(message: str) -> None:
    print(f"image-test: {message}", flush=True)


def run(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = True,
    cwd: Path | None = None,
    stdout: Any = subprocess.PIPE,
    stdin: Any = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(args),
        env=env,
        timeout=timeout,
        text=True,
        stdout=stdout,
        stderr=subprocess.STDOUT if stdout is subprocess.PIPE else stdout,
        cwd=cwd,
        check=False,
        stdin=stdin,
    )
    if check and result.returncode != 0:
        tail = (result.stdout or "")[-4000:]
        raise CheckFailed(f"{' '.join(args[:4])} ... exited {result.returncode}:\n{tail}")
    return result


@dataclass
class Timings:
    steps: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        log(f"{name} ...")
        start = time.monotonic()
        try:
            yield
        finally:
            self.steps[name] = round(time.monotonic() - start, 1)
            log(f"{name}: {self.steps[name]} s")


# -- tools -------------------------------------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why this machine cannot run the test, or None. Missing Debian packages are installed, not a reason."""
    if os.geteuid() != 0:
        return "needs root to start a private dockerd (run `make image-test` as root)"
    if not shutil.which("apt-get") and not all(shutil.which(t) for t in {**TOOLS, **TOOLS_ROOT}):
        return "dockerd, docker-compose and debootstrap are missing and apt-get is not here to install them"
    return None


def ensure_tools() -> None:
    """Install Debian's docker.io, docker-compose and debootstrap if missing (no service is started:
    the test runs its own dockerd)."""
    missing = sorted({pkg for tool, pkg in {**TOOLS, **TOOLS_ROOT}.items() if not _tool(tool)})
    if not missing:
        return
    log(f"installing {' '.join(missing)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env, timeout=300)
    run(["apt-get", "install", "-y", "-qq", "-o", "DPkg::Lock::Timeout=300", *missing], env=env, timeout=900)


def _tool(name: str) -> str | None:
    # Debian's docker client (/usr/bin/docker) matches Debian's dockerd; another client may be first on PATH.
    for candidate in (f"/usr/bin/{name}", f"/usr/sbin/{name}"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which(name)


def tool(name: str) -> str:
    found = _tool(name)
    if not found:
        raise Unavailable(f"{name} not found")
    return found


# -- the private engine ------------------------------------------------------------------------------


class Engine:
    """A private dockerd under ``tmp``: own data root, exec root, socket and containerd."""

    def __init__(self, tmp: Path, artifacts: Path) -> None:
        self.tmp = tmp
        self.socket = tmp / "docker.sock"
        self.log_path = tmp / "dockerd.log"
        self.artifacts = artifacts
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_BUILDKIT": "0",
            "COMPOSE_DOCKER_CLI_BUILD": "0",
            "DOCKER_CONFIG": str(tmp / "client"),
        }
        self.docker = tool("docker")

    def start(self) -> None:
        (self.tmp / "client").mkdir(exist_ok=True)
        args = [
            tool("dockerd"),
            "--data-root", str(self.tmp / "data"),
            "--exec-root", str(self.tmp / "exec"),
            "--host", f"unix://{self.socket}",
            "--pidfile", str(self.tmp / "dockerd.pid"),
            # No default bridge and no iptables/forwarding changes: the host's networking is not touched.
            # Builds use the host's network; Compose's own network is a bridge reached through docker-proxy.
            "--bridge", "none",
            "--iptables=false",
            "--ip-masq=false",
            "--ip-forward=false",
            "--storage-driver", "overlay2",
            "--log-level", "warn",
        ]  # fmt: skip
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(
                    f"dockerd exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}"
                )
            # A dockerd still starting (containerd first) on a busy machine may take longer than the
            # probe's timeout to answer: that is "not yet", until the deadline.
            with contextlib.suppress(subprocess.TimeoutExpired):
                if self.socket.exists() and self.cli("version", check=False, timeout=10).returncode == 0:
                    return
            time.sleep(0.2)
        raise Unavailable(f"dockerd did not answer within 60 s: {self.log_path.read_text()[-2000:]}")

    def cli(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 600,
        stdout: Any = subprocess.PIPE,
        stdin: Any = None,
    ) -> subprocess.CompletedProcess[str]:
        return run(
            [self.docker, *args], env=self.env, check=check, timeout=timeout, stdout=stdout, stdin=stdin
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # Whatever is still running (after a failure) goes first, so dockerd exits quickly.
            running = self.cli("ps", "-aq", check=False, timeout=30).stdout.split()
            if running:
                self.cli("rm", "-f", *running, check=False, timeout=120)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        # A mount left by an interrupted daemon would keep its data root from being removed.
        for mount in reversed(_mounts_under(self.tmp)):
            subprocess.run(["umount", "-l", mount], check=False)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    with open("/proc/self/mounts") as mounts:
        return [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]


# -- base images -------------------------------------------------------------------------------------


def host_ca_bundle() -> Path | None:
    """The CA bundle this host trusts, when it is not only Debian's (a TLS-inspecting proxy's CA, say):
    the base images get it, so pip, uv and npm reach the registries as this host does."""
    for name in ("SSL_CERT_FILE", "PIP_CERT", "NODE_EXTRA_CA_CERTS"):
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return Path(value)
    return None


def package_versions() -> dict[str, str]:
    def query() -> dict[str, str]:
        out = run(["apt-cache", "policy", *KEY_PACKAGES], timeout=60).stdout
        versions, current = {}, None
        for line in out.splitlines():
            if not line.startswith(" "):
                current = line.rstrip(":")
            elif line.strip().startswith("Candidate:") and current:
                versions[current] = line.split(":", 1)[1].strip()
        return versions

    versions = query()
    if any(versions.get(p, "(none)") == "(none)" for p in KEY_PACKAGES):
        run(["apt-get", "update", "-qq"], timeout=300)
        versions = query()
    missing = [p for p in KEY_PACKAGES if versions.get(p, "(none)") == "(none)"]
    if missing:
        raise Unavailable(f"Debian packages not found by apt-cache: {missing}")
    return versions


def cache_key(versions: dict[str, str], ca: Path | None) -> str:
    digest = hashlib.sha256(json.dumps(versions, sort_keys=True).encode())
    digest.update(f"{SUITE} {MIRROR} {SECURITY_MIRROR}".encode())
    for path in sorted(BASES.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    if ca is not None:
        digest.update(ca.read_bytes())
    return digest.hexdigest()[:16]


def build_bases(engine: Engine, tmp: Path, ca: Path | None, logs: Path) -> None:
    rootfs = tmp / "rootfs"
    run(
        [tool("debootstrap"), "--variant=minbase", SUITE, str(rootfs), MIRROR],
        timeout=1200,
        stdout=(logs / "debootstrap.log").open("w"),
    )
    (rootfs / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} {SUITE} main\ndeb {MIRROR} {SUITE}-updates main\n"
        f"deb {SECURITY_MIRROR} {SUITE}-security main\n"
    )
    for leftover in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        leftover.unlink()
    changes: list[str] = []
    if ca is not None:
        (rootfs / "etc/ssl").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ca, rootfs / "etc/ssl/host-ca-bundle.crt")
        bundle = "/etc/ssl/host-ca-bundle.crt"
        changes = ["--change", f"ENV SSL_CERT_FILE={bundle} PIP_CERT={bundle} NODE_EXTRA_CA_CERTS={bundle}"]
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    engine.cli("import", *changes, "-", BASE_TAG, stdin=tar.stdout, timeout=600)
    if tar.wait() != 0:
        raise CheckFailed("tar of the debootstrap root file system failed")
    shutil.rmtree(rootfs, ignore_errors=True)

    def build(image: str) -> None:
        with (logs / f"build-{image.split('/')[-1]}.log").open("w") as out:
            engine.cli(
                "build", "--network", "host", "-f", str(BASES / LOCAL_IMAGES[image][0]), "-t", image,
                str(BASES), stdout=out, timeout=1200,
            )  # fmt: skip

    # Node.js with Debian's npm (some 400 packages) takes longest: it is built beside the others.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        node = pool.submit(build, "iot-local/node")
        for image in LOCAL_IMAGES:
            if image != "iot-local/node":
                build(image)
        node.result()


def base_images(engine: Engine, cache: Path, tmp: Path, timings: Timings, logs: Path) -> str:
    """Load the base images from the cache, or build and cache them; returns 'cached' or 'built'."""
    ca = host_ca_bundle()
    key = cache_key(package_versions(), ca)
    tarball = cache / f"bases-{key}.tar"
    images = [BASE_TAG, *LOCAL_IMAGES]
    if tarball.is_file():
        with timings.step("load cached base images"):
            engine.cli("load", "-i", str(tarball), timeout=600)
        how = "cached"
    else:
        with timings.step("build base images (debootstrap + Debian packages)"):
            build_bases(engine, tmp, ca, logs)
        with timings.step("save base images to the cache"):
            cache.mkdir(parents=True, exist_ok=True)
            partial = cache / f".bases-{key}.{os.getpid()}.tar"
            engine.cli("save", "-o", str(partial), *images, timeout=600)
            partial.rename(tarball)
            for old in cache.glob("bases-*.tar"):
                if old != tarball:
                    old.unlink()
        how = "built"
    for image, (_, aliases) in LOCAL_IMAGES.items():
        for alias in aliases:
            engine.cli("tag", image, alias)
    return how


# -- the project image -------------------------------------------------------------------------------


def build_project(engine: Engine, logs: Path) -> dict[str, Any]:
    with (logs / "build-project.log").open("w") as out:
        engine.cli("build", "--network", "host", "-t", PROJECT_IMAGE, str(ROOT), stdout=out, timeout=1500)
    info = json.loads(engine.cli("image", "inspect", PROJECT_IMAGE).stdout)[0]
    user = info["Config"].get("User", "")
    check(user == "10001:10001", f"the image runs as {user!r}, not 10001:10001")
    probe = (
        f"for t in {' '.join(BUILD_TOOLS)}; do command -v $t; done; "
        "python -c 'import importlib.util,sys; "
        f"print(*[m for m in {json.dumps(DEV_MODULES)} if importlib.util.find_spec(m)])'"
    )
    found = engine.cli("run", "--rm", "--network", "none", "--entrypoint", "sh", PROJECT_IMAGE, "-c", probe)
    check(not found.stdout.strip(), f"the image has build tools or development packages: {found.stdout!r}")
    return {"size_mb": round(info["Size"] / 1e6, 1), "layers": len(info["RootFS"]["Layers"])}


# -- the Compose stack and the smoke test -------------------------------------------------------------


def check(condition: object, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll state no event announces (a container's health, an HTTP answer) until true, within a deadline."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
        except (OSError, urllib.error.URLError, ValueError) as exc:
            result, last = None, exc
        if result:
            return result
        time.sleep(interval)
    raise CheckFailed(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def http(method: str, url: str, body: object = None, token: str | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@dataclass
class Stack:
    engine: Engine
    project: str
    env: dict[str, str]
    ports: dict[str, int]

    def compose(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        command = [tool("docker-compose"), "-p", self.project, "-f", str(COMPOSE_FILE), "-f", str(OVERRIDE)]
        return run([*command, *args], env=self.env, check=check, timeout=timeout)

    def containers(self, service: str | None = None) -> list[dict[str, Any]]:
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        ids = self.engine.cli("ps", "-aq", *filters).stdout.split()
        if not ids:
            return []
        found: list[dict[str, Any]] = json.loads(self.engine.cli("inspect", *ids).stdout)
        return found

    def container(self, service: str) -> dict[str, Any]:
        found = self.containers(service)
        check(len(found) == 1, f"{len(found)} containers for service {service}")
        return found[0]

    def url(self, service: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}{path}"

    def save_logs(self, into: Path) -> None:
        into.mkdir(parents=True, exist_ok=True)
        for info in self.containers():
            service = info["Config"]["Labels"].get("com.docker.compose.service", info["Name"].strip("/"))
            out = self.engine.cli("logs", "--timestamps", info["Id"], check=False, timeout=60).stdout
            state = json.dumps(info["State"], indent=2)
            (into / f"{service}.log").write_text(f"{out}\n--- state ---\n{state}\n")


def new_stack(engine: Engine) -> Stack:
    ports = {name: free_port() for name in ("api", "realtime", "ingest", "mqtt")}
    secret = {
        "IOT_JWT_SECRET": secrets.token_hex(48),
        "IOT_BOOTSTRAP_ADMIN_PASSWORD": secrets.token_hex(12),
        "IOT_POSTGRES_PASSWORD": secrets.token_hex(24),
        "IOT_MQTT_ADMIN_PASSWORD": secrets.token_hex(24),
        "IOT_MQTT_INGEST_PASSWORD": secrets.token_hex(24),
        "IOT_MQTT_API_PASSWORD": secrets.token_hex(24),
    }
    env = {key: value for key, value in engine.env.items() if not key.startswith("IOT_")}
    env |= secret | {
        "IOT_API_PUBLISHED_PORT": str(ports["api"]),
        "IOT_REALTIME_PUBLISHED_PORT": str(ports["realtime"]),
        "IOT_INGEST_PUBLISHED_PORT": str(ports["ingest"]),
        "IOT_MQTT_PUBLISHED_PORT": str(ports["mqtt"]),
        "IOT_PUBLIC_REALTIME_URL": f"ws://127.0.0.1:{ports['realtime']}/ws",
        "IOT_CORS_ORIGINS": f"http://127.0.0.1:{ports['api']}",
        "IOT_BOOTSTRAP_ADMIN_EMAIL": "admin@example.com",
    }
    return Stack(engine, f"iotimage{uuid.uuid4().hex[:8]}", env, ports)


def smoke_test(stack: Stack, timings: Timings) -> None:
    with timings.step("compose up"):
        stack.compose("up", "-d", "--no-build", timeout=600)

    with timings.step("services ready"):
        for service in PLATFORM_SERVICES:
            wait_until(
                lambda s=service: http("GET", stack.url(s, "/readyz"))[0] == 200, 180, f"{service} /readyz"
            )
        for service in HEALTHY_SERVICES:

            def healthy(s: str = service) -> bool:
                state = stack.container(s)["State"]
                check(
                    state["Status"] == "running", f"{s} is {state['Status']}: exit code {state['ExitCode']}"
                )
                return bool(state.get("Health", {}).get("Status") == "healthy")

            wait_until(healthy, 120, f"{service}'s healthcheck")

    with timings.step("smoke test"):
        for oneshot in ("migrate", "mosquitto-init", "mosquitto-sim-off"):
            state = stack.container(oneshot)["State"]
            check(
                state["Status"] == "exited" and state["ExitCode"] == 0,
                f"{oneshot}: {state['Status']}, exit code {state['ExitCode']}",
            )
        for service in (*PLATFORM_SERVICES, "migrate"):
            info = stack.container(service)
            check(info["Config"]["User"] == "10001:10001", f"{service} runs as {info['Config']['User']!r}")
        for service in PLATFORM_SERVICES:
            uid = stack.engine.cli("exec", stack.container(service)["Id"], "id", "-u").stdout.strip()
            check(uid == "10001", f"{service} runs as uid {uid}")
            top = stack.engine.cli("top", stack.container(service)["Id"], "-o", "pid,uid,args").stdout
            uids = {line.split()[1] for line in top.splitlines()[1:] if line.strip()}
            check(uids == {"10001"}, f"{service}'s processes run as {uids}:\n{top}")
        asyncio.run(device_flow(stack))
        dashboard(stack)


async def device_flow(stack: Stack) -> None:
    """Log in, register a device, subscribe to it over the WebSocket, publish one reading over MQTT as the
    device (with the credentials the API issued) and see it on the WebSocket and in PostgreSQL."""
    import gmqtt
    from websockets.asyncio.client import connect

    status, login = http(
        "POST",
        stack.url("api", "/api/v1/auth/login"),
        {
            "email": stack.env["IOT_BOOTSTRAP_ADMIN_EMAIL"],
            "password": stack.env["IOT_BOOTSTRAP_ADMIN_PASSWORD"],
        },
    )
    check(status == 200, f"login: {status} {login}")
    token = login["access_token"]
    status, device = http("POST", stack.url("api", "/api/v1/devices"), {"id": DEVICE, "type": "smoke"}, token)
    check(status == 201, f"device registration: {status} {device}")
    check(device["mqtt"]["username"] == DEVICE, f"device credentials: {device.get('mqtt')}")
    status, listed = http("GET", stack.url("api", f"/api/v1/devices/{DEVICE}"), token=token)
    check(status == 200 and listed["id"] == DEVICE, f"registered device: {status} {listed}")

    status, realtime = http("POST", stack.url("api", "/api/v1/realtime/token"), token=token)
    check(status in (200, 201), f"realtime token: {status} {realtime}")
    ws_url = f"ws://127.0.0.1:{stack.ports['realtime']}/ws"
    async with connect(ws_url, open_timeout=10) as ws:
        await ws.send(json.dumps({"type": "auth", "token": realtime["token"], "id": 1}))
        ack = json.loads(await asyncio.wait_for(ws.recv(), 10))
        check(ack == {"type": "ack", "id": 1}, f"WebSocket auth: {ack}")
        await ws.send(json.dumps({"type": "subscribe", "devices": [DEVICE], "id": 2}))
        # The device's latest values (none yet) come with the acknowledgement.
        frames = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(2)]
        check(
            {"type": "ack", "id": 2} in frames
            and {"type": "latest", "device_id": DEVICE, "metrics": {}} in frames,
            f"WebSocket subscribe: {frames}",
        )

        client = gmqtt.Client(f"{DEVICE}-smoke")
        client.set_config({"reconnect_retries": 0})
        client.set_auth_credentials(DEVICE, device["mqtt"]["password"])
        await client.connect("127.0.0.1", stack.ports["mqtt"])
        client.publish(f"devices/telemetry/{DEVICE}", json.dumps({"temperature": 21.5}), qos=1)

        async def telemetry() -> dict[str, Any]:
            while True:
                frame: dict[str, Any] = json.loads(await ws.recv())
                if frame.get("type") == "telemetry":
                    return frame

        frame = await asyncio.wait_for(telemetry(), 20)
        await client.disconnect()
    check(
        frame["device_id"] == DEVICE and frame["metrics"] == {"temperature": 21.5},
        f"WebSocket telemetry frame: {frame}",
    )
    sql = f"SELECT count(*) FROM telemetry WHERE device_id = '{DEVICE}'"
    postgres = stack.container("postgres")["Id"]
    stored = stack.engine.cli("exec", postgres, "psql", "-U", "iot", "-d", "iot", "-tAc", sql).stdout.strip()
    check(stored == "1", f"readings of {DEVICE} in PostgreSQL: {stored!r}")
    status, latest = http("GET", stack.url("api", f"/api/v1/devices/{DEVICE}/latest"), token=token)
    check(status == 200 and latest["metrics"]["temperature"]["value"] == 21.5, f"latest: {status} {latest}")


def dashboard(stack: Stack) -> None:
    status, page = http("GET", stack.url("api", "/dashboard/"))
    check(
        status == 200 and isinstance(page, str) and "<script" in page,
        f"dashboard page: {status} {page!r:.300}",
    )
    status, config = http("GET", stack.url("api", "/dashboard/config.json"))
    check(status == 200, f"dashboard config: {status} {config}")
    check(stack.env["IOT_PUBLIC_REALTIME_URL"] in json.dumps(config), f"dashboard config: {config}")


def compose_down(stack: Stack) -> None:
    stack.compose("down", "-v", "--remove-orphans", timeout=300)
    label = f"label=com.docker.compose.project={stack.project}"
    left = {
        "containers": stack.engine.cli("ps", "-aq", "--filter", label).stdout.split(),
        "volumes": stack.engine.cli("volume", "ls", "-q", "--filter", label).stdout.split(),
        "networks": stack.engine.cli("network", "ls", "-q", "--filter", label).stdout.split(),
    }
    check(not any(left.values()), f"docker-compose down left {left}")


# -- main --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def machine_lock(cache: Path) -> Iterator[None]:
    """One run at a time on a machine: two private engines would compete for the same bridge subnets."""
    lock_dir = Path("/run/lock") if Path("/run/lock").is_dir() else cache
    lock_dir.mkdir(parents=True, exist_ok=True)
    with (lock_dir / "iot-image-test.lock").open("w") as handle:
        deadline = time.monotonic() + 1800
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CheckFailed("another image test held the lock for 30 min") from None
                time.sleep(1)
        yield


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts" / "image-test")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--report", type=Path, help="write the timings and image size as JSON here")
    args = parser.parse_args(argv)

    reason = unavailable_reason()
    if reason:
        log(f"cannot run here: {reason}")
        return 3
    timings = Timings()
    report: dict[str, Any] = {"steps": timings.steps}
    started = time.monotonic()
    shutil.rmtree(args.artifacts, ignore_errors=True)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    failed: BaseException | None = None
    with machine_lock(args.cache):
        tmp = Path(tempfile.mkdtemp(prefix="iot-image-"))
        logs = tmp / "logs"
        logs.mkdir()
        engine: Engine | None = None
        stack: Stack | None = None
        try:
            ensure_tools()
            engine = Engine(tmp, args.artifacts)
            with timings.step("start dockerd"):
                engine.start()
            report["bases"] = base_images(engine, args.cache, tmp, timings, logs)
            with timings.step("build the project image"):
                report["image"] = build_project(engine, logs)
            log(f"image {PROJECT_IMAGE}: {report['image']['size_mb']} MB")
            stack = new_stack(engine)
            smoke_test(stack, timings)
            with timings.step("compose down"):
                compose_down(stack)
            stack = None
        except Exception as exc:
            failed = exc
            log(f"FAILED: {type(exc).__name__}: {exc}")
            if stack is not None:
                stack.save_logs(args.artifacts)
                stack.compose("down", "-v", "--remove-orphans", check=False, timeout=300)
        finally:
            if engine is not None:
                with timings.step("stop dockerd"):
                    engine.stop()
                if failed is not None:
                    shutil.copy(engine.log_path, args.artifacts / "dockerd.log")
            if failed is not None:
                for path in logs.iterdir():
                    shutil.copy(path, args.artifacts / path.name)
            with timings.step("remove the engine's folder"):
                shutil.rmtree(tmp, ignore_errors=True)
    report["total_s"] = round(time.monotonic() - started, 1)
    report["ok"] = failed is None
    log(json.dumps(report))
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    if failed is not None:
        log(f"logs kept in {args.artifacts}")
        return 3 if isinstance(failed, Unavailable) else 1
    shutil.rmtree(args.artifacts, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
