"""The platform's image built from the shipped Dockerfile and deploy/compose.yml run for real.

scripts/image_test.py does the work (``make image-test``): a private dockerd, base images from Debian's
packages (cached under /var/cache/iot-image-test), the image, the Compose stack and a smoke test through
its published ports. It needs root; elsewhere this test is skipped with the reason, but never in CI
(``CI`` set), where it fails instead. Container logs are kept in artifacts/image-test/ on failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "image_test.py"
UNAVAILABLE = 3
# A cold run (debootstrap and the base images) takes about 15 min on 2 cores; a cached one a few minutes.
TIMEOUT_S = 2400


@pytest.mark.image
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_the_image_builds_and_the_compose_stack_serves_through_its_published_ports() -> None:
    if os.geteuid() != 0:
        reason = "the image test starts its own dockerd: run as root (make image-test)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    output = result.stdout + result.stderr
    print(output)
    if result.returncode == UNAVAILABLE and not os.environ.get("CI"):
        pytest.skip(output.strip().splitlines()[-1])
    assert result.returncode == 0, output[-6000:]
