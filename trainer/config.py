"""The training configuration: one dataclass, the defaults chosen by measurement (see README, Training)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aevae.manifest import KINDS
from aevae.repository import NAME_PATTERN

# Training precisions: "fp32", or "bf16" (CPU autocast: the matrix products in bfloat16; the loss, the master
# weights and the optimizer state in float32). bf16 is the default: over the full default run it reached
# fp32's quality (AE 102.91 against 103.21 nats, VAE 116.68 against 116.70) in less time. See
# docs/measurements.md, Reduced precision.
PRECISIONS = ("fp32", "bf16")
# The largest --seed: torch's generators take 64-bit seeds (each epoch's order is seeded with seed + epoch) and
# numpy's none below 0; a seed outside 0..2**63-1 failed in the worker, or (a negative one) only in the latent
# statistics after the whole run.
MAX_SEED = 2**63 - 1


def _temporary_folder() -> str:
    """$TMPDIR or the like, for the storage path's default. Without a writable one (a read-only root with no
    /tmp mount), tempfile's search raises, and every `aevae` command failed at start, `aevae serve` included,
    since the CLI builds `train`'s options from these defaults; the path a run would use is named instead, and
    the run says it cannot write there when it starts (trainer.job._run_name)."""
    try:
        return tempfile.gettempdir()
    except FileNotFoundError:
        return os.environ.get("TMPDIR") or "/tmp"


# Where things are, which says nothing of what is trained: left out of manifests and of a run's identity.
PLACES = ("data_root", "models_dir", "storage_path", "address")


@dataclass
class TrainConfig:
    models: tuple[str, ...] = ("ae", "vae")
    # 15 with the models side by side: AE 102.79, VAE 116.62 nats in 2 min 39 s (14: 102.82 / 116.78, over
    # the VAE's bar of 116.7); docs/measurements.md, Reduced precision.
    epochs: int = 15
    batch_size: int = 256
    lr: float = 3e-3
    seed: int = 0
    latent_dim: int = 4
    hidden: tuple[int, ...] = (1024, 512, 256)
    train_limit: int | None = None
    num_workers: int = 1
    cpus_per_worker: int = field(default_factory=lambda: max(1, (os.cpu_count() or 1)))
    # name to write under when it differs from the kind, e.g. "ae-2d" for a 2-d AE that must never become
    # the newest "ae"; only with a single model.
    name: str | None = None
    data_root: str | None = None
    models_dir: str | None = None
    # Where Ray keeps its run checkpoints; None (also when passed) is $TMPDIR/aevae-ray, filled in by
    # __post_init__ so that this is the one place the default is defined and `aevae train --help` shows it.
    storage_path: str | None = None
    address: str | None = None
    precision: str = "bf16"
    # Continue the newest stopped run of this same configuration from its last checkpoint (trainer.job,
    # `stopped_run`) instead of starting afresh; a fresh run when there is none.
    resume: bool = False

    def __post_init__(self) -> None:
        """Refuses what could only fail after training (a name the repository would not write), so a run is
        never lost at its end; fills in the storage path's default."""
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be an integer from 0 to {MAX_SEED}, got {self.seed!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.name is not None and not NAME_PATTERN.match(self.name):
            raise ValueError(f"--name {self.name!r} is not a model name: 1 to 64 lowercase letters, digits, '.', "
                             f"'_' or '-', starting with a letter or digit, e.g. ae-2d ({NAME_PATTERN.pattern})")
        if self.name in KINDS and tuple(self.models) != (self.name,):
            # `--models vae --name ae` wrote a VAE as the newest "ae": every client asking for the AE got a VAE
            raise ValueError(f"--name {self.name} is where the {self.name.upper()} versions go; write the "
                             f"{'/'.join(self.models).upper()} under its own name (leave --name out) or another, "
                             f"e.g. {self.models[0]}-2d")
        if self.storage_path is None:
            self.storage_path = str(Path(_temporary_folder()) / "aevae-ray")

    def to_json(self) -> dict:
        return asdict(self)

    def without_places(self) -> dict:
        """The options without where the data, the repository, the checkpoints and Ray are (`PLACES`): what a
        version's manifest records of its training."""
        return {k: v for k, v in self.to_json().items() if k not in PLACES}

    def run_identity(self) -> dict:
        """What makes two runs the same run, so that one may continue the other's checkpoint: everything that
        shapes the models, the data they see and the schedule. Not the places, nor the CPUs (a checkpoint holds
        no per-thread state), nor whether this run resumes."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in self.without_places().items() if key not in ("cpus_per_worker", "resume")}

    def target_name(self, kind: str) -> str:
        return self.name or kind
