"""Many models and versions per process: loaded models cached by (name, version) over the repository.

The repository listing is a snapshot, refreshed when it is older than `refresh_seconds` or when a request
names a model or version it does not hold, so a version written by a later `aevae train` becomes visible
without a restart. Errors reuse ModelRepository's messages, which list what exists.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from aevae.inference import LoadedModel
from aevae.repository import ModelRepository, RepositoryError, Version
from aevae.services.errors import FailedPrecondition, NotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSummary:
    """One model name, described by its newest version (what ListModels returns)."""

    name: str
    version: int
    versions: list[int]
    kind: str
    latent_dim: int
    image_shape: tuple[int, ...]
    metrics: dict[str, float] = field(default_factory=dict)


class ModelCache:
    def __init__(self, root: str | Path | None = None, refresh_seconds: float = 2.0, max_loaded: int = 32):
        self.repository = ModelRepository(root)
        self.refresh_seconds = refresh_seconds
        self.max_loaded = max_loaded
        self._versions: dict[str, list[Version]] = {}
        self._scanned_at = float("-inf")
        self._loaded: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def versions(self, force: bool = False) -> dict[str, list[Version]]:
        if force or time.monotonic() - self._scanned_at > self.refresh_seconds:
            with self._lock:
                self._versions = self.repository.list()
                self._scanned_at = time.monotonic()
        return self._versions

    def resolve(self, name: str, version: int | None) -> Version:
        """The named version, or the newest; rescans once before deciding that it does not exist."""
        found = _pick(self.versions(), name, version)
        if found is None:
            found = _pick(self.versions(force=True), name, version)
        if found is None:
            try:
                return self.repository.resolve(name, version)  # raises with the list of what exists
            except RepositoryError as exc:
                raise NotFound(str(exc)) from None
        return found

    def peek(self, name: str, version: int | None) -> LoadedModel | None:
        """The loaded model if serving it needs no disk access now (lock-free: safe on the event loop)."""
        if time.monotonic() - self._scanned_at > self.refresh_seconds:
            return None
        found = _pick(self._versions, name, version)
        return None if found is None else self._loaded.get((name, found.version))

    def get(self, name: str, version: int | None) -> LoadedModel:
        resolved = self.resolve(name, version)
        key = (name, resolved.version)
        model = self._loaded.get(key)
        if model is not None:
            return model
        with self._lock:
            model = self._loaded.get(key)
            if model is None:
                try:
                    model = LoadedModel.from_version(resolved)
                except Exception as exc:  # noqa: BLE001 - a version that cannot load is unusable, not fatal
                    log.warning("cannot load %s/%s: %s", name, resolved.version, exc)
                    raise FailedPrecondition(f"model {name!r} version {resolved.version} cannot be loaded: {exc}")
                log.info("loaded %s/%s", name, resolved.version)
                self._loaded[key] = model
                while len(self._loaded) > self.max_loaded:
                    self._loaded.popitem(last=False)
            else:
                self._loaded.move_to_end(key)
        return model

    def preload(self) -> None:
        """Loads the newest version of every model, so that the first requests need no disk."""
        for name in self.versions(force=True):
            try:
                self.get(name, None)
            except Exception as exc:  # noqa: BLE001 - a request for it will report the error
                log.warning("not preloaded: %s", exc)

    def summaries(self) -> list[ModelSummary]:
        result = []
        for name, versions in sorted(self.versions(force=True).items()):
            newest = versions[-1]
            metrics = newest.manifest.get("metrics") or {}
            result.append(ModelSummary(
                name=name,
                version=newest.version,
                versions=[v.version for v in versions],
                kind=newest.kind,
                latent_dim=newest.latent_dim,
                image_shape=tuple(int(s) for s in newest.manifest.get("image_shape", (32, 32))),
                metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
            ))
        return result


def _pick(versions: dict[str, list[Version]], name: str, version: int | None) -> Version | None:
    candidates = versions.get(name)
    if not candidates:
        return None
    if not version:
        return candidates[-1]
    return next((v for v in candidates if v.version == version), None)
