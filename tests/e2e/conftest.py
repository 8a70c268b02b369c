"""Fixtures for end-to-end tests: the platform's console scripts run as processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from iot_testkit.processes import ServiceProcess


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def service(artifacts_dir: Path) -> Iterator[Callable[[str, Mapping[str, str]], ServiceProcess]]:
    """Start a console script with extra environment; every one still running is stopped afterwards."""
    started: list[ServiceProcess] = []

    def start(script: str, env: Mapping[str, str]) -> ServiceProcess:
        proc = ServiceProcess(script, env, artifacts_dir).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill()
