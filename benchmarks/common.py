"""What the benchmark scripts share: the repository they measure and a timer. Imported by the scripts in
this folder (they run as scripts, so this folder is on sys.path)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def repository(arg: str | None, prefix: str = "aevae-bench-") -> Path:
    """--models-dir when given; else a repository holding `vae` with the default architecture and random
    weights, written by the trainer's own writer: the same cost per image as a trained model."""
    if arg:
        return Path(arg)
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import write_tiny

    root = Path(tempfile.mkdtemp(prefix=prefix)) / "models"
    write_tiny(root, "vae", "vae", hidden=(1024, 512, 256))
    return root


def timed(call: Callable[[], object], n: int) -> np.ndarray:
    """Seconds each of n calls took."""
    out = np.empty(n)
    for i in range(n):
        start = time.perf_counter()
        call()
        out[i] = time.perf_counter() - start
    return out
