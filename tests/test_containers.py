"""The container smoke test in the suite: deploy/scripts/smoke_containers.py (`make smoke-containers`) over the
session's trained repository. It builds the lean encoder, decoder and ui images (podman; the Debian base
from debootstrap where no registry is reachable), starts them with podman-compose from deploy/compose.yaml,
waits for SERVING and for each image's HEALTHCHECK, round-trips MNIST digits through aevae.client against
the in-process model, checks the UI, and stops all three with SIGTERM (exit 0 within the grace).

Never skipped: `make test` installs podman when it is missing (make container-tools), as it installs
chromium for the browser tests. Needs root, as podman here does.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "deploy" / "scripts" / "smoke_containers.py"


@pytest.mark.timeout(1800)
def test_lean_images_serve_with_compose_round_trip_and_stop_cleanly(trained_repo: Path,
                                                                    pytestconfig: pytest.Config) -> None:
    for tool in ("podman", "buildah", "debootstrap"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: `make container-tools` (which `make test` runs) installs it")
    done = subprocess.run([sys.executable, str(SMOKE), "--models", str(trained_repo)], capture_output=True,
                          text=True, timeout=1700, cwd=ROOT)
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-10000:]}"
    # the figures (image sizes, build times, SERVING time, round trip, SIGTERM) into the test log
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + done.stdout.strip(), flush=True)
