"""Running the platform's console scripts and private brokers as processes under test."""

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
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest

from tests.support.backends import MOSQUITTO_TEST_CONFIG, port_open

BIN = Path(sys.executable).parent
JWT_SECRET = secrets.token_urlsafe(48)
"""``IOT_JWT_SECRET`` of every service a test starts: random per test run (there is no default)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServiceProcess:
    """A console script of the platform, started with the given environment, logs kept in a file."""

    def __init__(self, script: str, env: Mapping[str, str], log_dir: Path) -> None:
        self.script = script
        self.env = {**os.environ, "IOT_LOG_FORMAT": "json", "IOT_JWT_SECRET": JWT_SECRET, **env}
        self.log_path = log_dir / f"{script}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(BIN / self.script)], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        return self

    def wait_http(self, url: str, timeout: float = 30.0, status: int = 200) -> None:
        """Wait until ``url`` answers ``status``; fail with the process log if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.script} exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(url, timeout=1.0).status_code == status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{url} did not answer {status} within {timeout}s:\n{self.logs()}")

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        """Wait until the log holds ``text``; fail with the log if the process exits first or time is up."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = self.proc.poll() is not None
            if text in self.log_path.read_text(errors="replace"):
                return
            if exited:
                raise AssertionError(f"{self.script} exited with {self.proc.returncode}:\n{self.logs()}")
            time.sleep(0.05)
        raise AssertionError(f"{self.script} did not log {text!r} within {timeout}s:\n{self.logs()}")

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


@contextlib.contextmanager
def mosquitto_process(config: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``mosquitto -c config``, waited for until it listens on ``port``, terminated afterwards."""
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"mosquitto did not start on {port}: {err}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def mosquitto(
    extra_config: str = "", port: int | None = None, anonymous: bool = True, directory: Path | None = None
) -> Iterator[str]:
    """A private Mosquitto on a free port (for tests that restart it or need a special config).

    ``extra_config`` may name files in ``directory`` (a temporary one by default), which outlives the
    broker when given, so a test can restart a broker on the same port and state.
    """
    port = port or free_port()
    with tempfile.TemporaryDirectory() as tmp:
        folder = directory or Path(tmp)
        config = folder / "mosquitto.conf"
        base = MOSQUITTO_TEST_CONFIG.replace("listener 1883", f"listener {port} 127.0.0.1")
        if not anonymous:
            base = base.replace("allow_anonymous true", "allow_anonymous false")
        config.write_text(base + extra_config.replace("{dir}", str(folder)))
        with mosquitto_process(config, port):
            yield f"mqtt://127.0.0.1:{port}"


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
