"""The model repository: `<root>/<name>/<version>/{manifest.json, weights.pt, latent_stats.json}`.

Versions are integers and appear atomically: a version is written into a hidden folder beside its siblings and
renamed into place, so a reader never sees half of one. The newest complete version is the default; a broken
version (no manifest, unreadable files, weights that are not a plain state_dict) is reported and skipped.
Weights are loaded with `weights_only=True`: a weights file carrying a pickle payload is refused, never run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MODELS_DIR_ENV = "AEVAE_MODELS_DIR"
MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"
STATS = "latent_stats.json"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")

log = logging.getLogger(__name__)


class RepositoryError(LookupError):
    """A model or version does not exist or cannot be loaded; the message lists what does exist."""


def models_dir(value: str | os.PathLike[str] | None = None) -> Path:
    """--models-dir wins, then AEVAE_MODELS_DIR, then ./models."""
    return Path(value or os.environ.get(MODELS_DIR_ENV) or "models").expanduser()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Version:
    """A complete version on disk, with its manifest already parsed and checked."""

    name: str
    version: int
    path: Path
    manifest: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def latent_dim(self) -> int:
        return int(self.manifest["latent_dim"])

    def latent_stats(self) -> dict[str, Any]:
        return json.loads((self.path / STATS).read_text())


@dataclass
class Scan:
    """What a look at the repository found: good versions by name, and the broken ones with the reason."""

    versions: dict[str, list[Version]] = field(default_factory=dict)
    broken: list[tuple[Path, str]] = field(default_factory=list)


def _check_version(name: str, number: int, path: Path) -> Version:
    """Raises ValueError with the reason when the version is incomplete or inconsistent."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable {MANIFEST}: {exc}") from exc
    for key in ("kind", "latent_dim", "architecture", "files"):
        if key not in manifest:
            raise ValueError(f"{MANIFEST} lacks {key!r}")
    for filename in (WEIGHTS, STATS):
        if not (path / filename).is_file():
            raise ValueError(f"no {filename}")
    return Version(name=name, version=number, path=path, manifest=manifest)


class ModelRepository:
    """Reads and writes the repository at `root`. Cheap to create; every call looks at the disk anew."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = models_dir(root)

    def scan(self) -> Scan:
        scan = Scan()
        if not self.root.is_dir():
            return scan
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and NAME_PATTERN.match(p.name)):
            found = []
            for entry in model_dir.iterdir():
                if not (entry.is_dir() and entry.name.isdigit()):
                    continue
                try:
                    found.append(_check_version(model_dir.name, int(entry.name), entry))
                except ValueError as reason:
                    scan.broken.append((entry, str(reason)))
            if found:
                scan.versions[model_dir.name] = sorted(found, key=lambda v: v.version)
        for path, reason in scan.broken:
            log.warning("skipping broken model version %s: %s", path, reason)
        return scan

    def list(self) -> dict[str, list[Version]]:
        return self.scan().versions

    def describe(self) -> str:
        """`ae: 1, 2; vae: 1` - what exists, for error messages."""
        versions = self.list()
        if not versions:
            return f"no models in {self.root} (train some with `aevae train`)"
        return "; ".join(f"{n}: {', '.join(str(v.version) for v in vs)}" for n, vs in versions.items())

    def resolve(self, name: str, version: int | None = None) -> Version:
        """The given version, or the newest complete one when version is None or 0."""
        versions = self.list()
        if name not in versions:
            raise RepositoryError(f"unknown model {name!r}; available: {self.describe()}")
        if not version:
            return versions[name][-1]
        for v in versions[name]:
            if v.version == version:
                return v
        raise RepositoryError(f"model {name!r} has no version {version}; available: {self.describe()}")

    def load(self, name: str, version: int | None = None) -> "LoadedModel":
        """Loads weights safely. A broken newest version falls back to the one before, with a warning."""
        from aevae.inference import LoadedModel

        chosen = self.resolve(name, version)
        candidates = [chosen] if version else list(reversed(self.list()[name]))
        errors = []
        for candidate in candidates:
            try:
                return LoadedModel.from_version(candidate)
            except Exception as exc:  # noqa: BLE001 - any failure to load makes the version unusable
                log.warning("cannot load %s/%s: %s", name, candidate.version, exc)
                errors.append(f"{candidate.version}: {exc}")
        raise RepositoryError(f"no loadable version of {name!r}: " + "; ".join(errors))

    def write(self, name: str, manifest: dict[str, Any], state_dict: dict, stats: dict[str, Any]) -> Version:
        """Writes the next version atomically and returns it. Concurrent writers each get their own number."""
        import torch

        if not NAME_PATTERN.match(name):
            raise ValueError(f"model name {name!r} must match {NAME_PATTERN.pattern}")
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=model_dir))
        try:
            torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, staging / WEIGHTS)
            (staging / STATS).write_text(json.dumps(stats, default=_json_default))
            manifest = dict(manifest, name=name)
            manifest["files"] = {f: sha256_file(staging / f) for f in (WEIGHTS, STATS)}
            while True:
                number = 1 + max((int(p.name) for p in model_dir.iterdir() if p.name.isdigit()), default=0)
                manifest["version"] = number
                (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
                target = model_dir / str(number)
                try:
                    os.rename(staging, target)  # fails if another writer took the number first
                except OSError:
                    if target.exists():
                        continue
                    raise
                return _check_version(name, number, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
