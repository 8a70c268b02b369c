"""``make compose-env`` writes the secrets Compose requires into an env file; ``make up`` checks them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from iot_api.settings import ApiSettings
from iot_common.settings import load_settings
from tests.deploy.manifests import interpolated_compose
from tests.deploy.test_manifests import REQUIRED_SECRETS

ROOT = Path(__file__).resolve().parents[2]


def compose_env(env_file: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/compose_env.py"), "--env-file", str(env_file), *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def read(env_file: Path) -> dict[str, str]:
    lines = [line for line in env_file.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_make_up_names_every_missing_secret_and_compose_env_writes_them(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    check = compose_env(env_file, "--check")
    assert check.returncode == 2
    for name in REQUIRED_SECRETS:
        assert f"{name} is not set" in check.stderr
    assert "make compose-env" in check.stderr

    assert compose_env(env_file).returncode == 0
    assert env_file.stat().st_mode & 0o077 == 0, "the env file is private to its owner"
    written = read(env_file)
    assert set(written) == {*REQUIRED_SECRETS, "IOT_MQTT_SIM_PASSWORD"}
    assert compose_env(env_file, "--check").returncode == 0
    # A second run keeps what is there.
    assert compose_env(env_file).returncode == 0
    assert read(env_file) == written

    services, missing = interpolated_compose(written)
    assert not missing
    load_settings(ApiSettings, services["services"]["api"]["environment"])


def test_make_up_refuses_a_published_placeholder(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    assert compose_env(env_file).returncode == 0
    check = compose_env(env_file, "--check", IOT_JWT_SECRET="compose-dev-secret-change-me-0123456789")
    assert check.returncode == 2
    assert "IOT_JWT_SECRET is a published placeholder" in check.stderr
