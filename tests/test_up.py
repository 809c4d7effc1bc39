"""`aevae up` over a trained repository: both services come up, answer, and stop cleanly on SIGTERM."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from aevae.client import AevaeError, DecoderClient, EncoderClient
from conftest import ROOT


def test_up_serves_both_services_says_how_to_call_them_and_stops_cleanly(trained_repo: Path, tmp_path) -> None:
    models = tmp_path / "models"
    shutil.copytree(trained_repo, models)
    process = subprocess.Popen(
        [sys.executable, "-m", "aevae.cli", "up", "--models-dir", str(models), "--encoder-port", "0",
         "--decoder-port", "0", "--no-ui"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=dict(os.environ),
    )
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert ready.wait(120), "".join(lines)
        text = "".join(lines)
        assert process.poll() is None, text
        encoder = re.search(r"encoder\s+grpc://(\S+)", text).group(1)
        decoder = re.search(r"decoder\s+grpc://(\S+)", text).group(1)
        assert f"grpcurl -plaintext {encoder} list" in text and "from aevae.client import" in text
        assert "training" not in text  # the repository was not empty
        with EncoderClient(encoder) as enc, DecoderClient(decoder) as dec:
            assert enc.health() == "SERVING" and dec.health() == "SERVING"
            z = enc.encode(np.zeros((2, 28, 28), np.uint8)).mean
            assert dec.decode(z).shape == (2, 32, 32)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, "".join(lines)
        assert "aevae up: stopped" in "".join(lines)
        for address in (encoder, decoder):
            with DecoderClient(address, timeout=2, retries=0) as gone, pytest.raises(AevaeError) as info:
                gone.health()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, f"{address} still answers after aevae up stopped"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
