"""What one report run is asked to do: one dataclass, filled from the command line or by a caller."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aevae.report.classifier import TRAIN_IMAGES

# The seed's measured ranges on its input images, shown beside ours (and only there).
SEED_RANGES = {"vae": (-5.93, 5.98), "ae": (-22.59, 74.46)}


class ReportError(RuntimeError):
    """The report cannot run as asked; the message says why and what to do instead."""


@dataclass
class ReportConfig:
    models_dir: str | None = None
    data_root: str | None = None
    out: Path = Path("reports")  # as the command's default: ./report is the package's own folder in a checkout
    samples: int = 1000
    seed: int = 0
    test_limit: int | None = None  # evaluate on the first N test images only (quick runs)
    ae2d: bool = True  # train ae-2d when it is missing
    ae2d_epochs: int | None = None  # default: the 4-d AE's epochs
    ae2d_train_limit: int | None = None  # default: the 4-d AE's training subset
    storage_path: str | None = None  # Ray checkpoints of the ae-2d training
    cache_dir: Path | None = None  # the digit classifier's cache; default ~/.cache/aevae
    classifier_train_limit: int = TRAIN_IMAGES
    reconstructions: int = 16
    traversal_steps: int = 12
    interpolation_pairs: int = 200  # random test pairs of different digits, scored frame by frame
    interpolation_steps: int = 9  # frames from one input to the other, both ends included
    interpolation_shown: int = 4  # pairs drawn in the figure
