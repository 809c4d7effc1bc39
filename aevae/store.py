"""The one load path: which version serves a request, loading it safely, and the broken-version policy.

Used alike by the services, the batch jobs, the report and the benchmarks. The policy:
- the default ("newest", `number=None`) is the newest *loadable* version: a version whose files fail their
  checksum or whose weights fail the safe load is marked broken once (one log line with the reason) and left
  out of the default; an explicit request for it gets FailedPrecondition naming the version and the reason;
- the repository is re-read when the snapshot is older than `refresh_seconds` (or a request names something
  the snapshot lacks), so a new `aevae train` run is served without a restart; a loaded or broken version
  whose files changed or disappeared (size, mtime, inode) is dropped then, and reloaded on its next use;
  it is never served stale.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from aevae.errors import FailedPrecondition, NotFound, ResourceExhausted, shorten
from aevae.inference import LoadedModel, load
from aevae.manifest import Manifest
from aevae.repository import MANIFEST, NAME_PATTERN, ModelRepository, Scan, Version
from aevae.runtimes import RuntimeUnavailable, label

log = logging.getLogger(__name__)

Key = tuple[str, int]
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
Fingerprint = tuple[tuple[str, int, int, int, int], ...]
# What a broken mark was made for: the files' fingerprint and the checksums the manifest listed then. A version
# rewritten in place between a scan and its load was checked against the old manifest: its new manifest lists
# other checksums, so the mark goes at the next scan even when the files' stat figures look alike.
Identity = tuple[Fingerprint | None, tuple[tuple[str, str], ...]]
# How many broken versions of one model an answer names with their reasons (the newest): a repository may hold
# any number, and listing them all made ListModels outgrow a small --max-message-bytes. The log names each.
LISTED_BROKEN = 16


@dataclass(frozen=True)
class ModelSummary:
    """One model name, described by its default version (what ListModels returns)."""

    name: str
    number: int  # the default version; 0 when no version of the model loads
    numbers: list[int]  # the versions that are not known to be broken, ascending
    kind: str
    latent_dim: int
    image_shape: tuple[int, ...]  # (height, width); () for a model none of whose manifests reads
    metrics: dict[str, float] = field(default_factory=dict)
    broken: dict[int, str] = field(default_factory=dict)  # number -> reason
    runtime: str = ""  # e.g. "onnx", or "onnx-int8" when decoding in reduced precision (aevae.runtimes.label)

    def listed_broken(self) -> list[tuple[int, str]]:
        """The broken versions an answer names, with their reasons: the newest LISTED_BROKEN, ascending."""
        return sorted(self.broken.items())[-LISTED_BROKEN:]


class ModelStore:
    def __init__(self, root: str | Path | None = None, refresh_seconds: float = 2.0, max_loaded: int = 32,
                 runtime: str = "auto", threads: int | None = None, allow_symlinks: bool = False,
                 precision: str = "fp32"):
        self.repository = ModelRepository(root, allow_symlinks=allow_symlinks)
        self.refresh_seconds = refresh_seconds
        self.max_loaded = max_loaded
        self.runtime = runtime
        self.threads = threads
        self.precision = precision  # of decoding: fp32, bf16 or int8 (aevae.runtimes.open_runtime)
        self._scan = Scan()
        self._scanned_at = float("-inf")
        self._scan_began = float("-inf")  # when the scan in _scan began
        self._loaded: OrderedDict[Key, tuple[Fingerprint, LoadedModel]] = OrderedDict()
        # Every version that loaded, held or evicted since: its files then and its runtime's label. The listing
        # describes these without loading them again (see _described).
        self._verified: dict[Key, tuple[Fingerprint, str]] = {}
        self._broken: dict[Key, tuple[Identity, str]] = {}
        self._defaults: dict[str, LoadedModel] = {}
        self._logged: set[tuple[str, str]] = set()
        # _lock guards the snapshot and the tables above, briefly; a load (hashing files, building sessions:
        # seconds for a big version or slow storage) holds only its version's lock from _loading, so calls for
        # the versions already loaded, and scans, go on meanwhile.
        self._lock = threading.RLock()
        self._loading: dict[Key, threading.Lock] = {}

    # -- the snapshot ---------------------------------------------------------------------------------------
    def scan(self, force: bool = False) -> Scan:
        """The repository as last seen, looked at anew when older than `refresh_seconds` or when `force`d
        (a name or version not found might have just been written). Calls that wait for the lock while
        another scans take the scan that began after they asked instead of each scanning again: a flood of
        requests for unknown models costs one scan at a time, not one each."""
        asked = time.monotonic()
        if force or asked - self._scanned_at > self.refresh_seconds:
            with self._lock:
                if self._scan_began >= asked:
                    return self._scan
                began = time.monotonic()
                scan = self.repository.scan()
                for b in scan.broken:
                    self._warn_once(str(b.path), f"skipping broken model version {b.name}/{b.number}: {b.reason}")
                for path, why in scan.ignored:
                    self._warn_once(str(path), f"ignoring {path}: {why}")
                self._revalidate(scan)
                self._scan = scan
                self._scan_began = began
                self._scanned_at = time.monotonic()
        return self._scan

    def _revalidate(self, scan: Scan) -> None:
        """Drops loaded models, loads remembered and broken marks whose files changed or disappeared since."""
        current = {(v.name, v.number): v for vs in scan.versions.values() for v in vs}
        for key, (verified_at, _) in list(self._verified.items()):
            if _fingerprint(current.get(key)) != verified_at:
                del self._verified[key]
        for key, (loaded_at, _) in list(self._loaded.items()):
            if _fingerprint(current.get(key)) != loaded_at:
                log.warning("model version %s/%s changed on disk; dropped, reloaded on its next use", *key)
                del self._loaded[key]
        for key, (marked_for, _) in list(self._broken.items()):
            version = current.get(key)
            if version is None or _identity(version) != marked_for:  # gone, or changed since
                del self._broken[key]
        # What was logged once stays quiet only while it is still so: a version repaired and broken again
        # is named again, and the set does not grow with every reason a changing file ever had.
        still = ({str(b.path) for b in scan.broken} | {str(path) for path, _ in scan.ignored}
                 | {str(current[key].path) for key in self._broken if key in current})
        self._logged = {entry for entry in self._logged if entry[0] in still}
        self._defaults.clear()

    def describe(self) -> str:
        """What is served, for error messages: the versions found less those that failed to load."""
        return self.scan().describe(self.repository.root, leave_out=set(self._broken))

    def holds(self, name: str) -> bool:
        """Whether the last scan found a model of this name (no disk access: safe on an event loop)."""
        return name in self._scan.versions or any(b.name == name for b in self._scan.broken)

    # -- resolving ------------------------------------------------------------------------------------------
    def _candidates(self, name: str) -> list[Version]:
        versions = self.scan().versions.get(name)
        if not versions and NAME_PATTERN.fullmatch(name):  # a name no folder can have is not looked for again
            versions = self.scan(force=True).versions.get(name)
        if not versions:
            unreadable = [b for b in self._scan.broken if b.name == name]
            if unreadable:  # the model is there, but not one of its versions has a usable manifest
                reasons = _listed_reasons([(b.number, b.reason) for b in unreadable])
                raise FailedPrecondition(f"no loadable version of model {name!r}: {reasons}")
            raise NotFound(f"unknown model {shorten(name)}; available: {self.describe()}")
        return versions

    def resolve(self, name: str, number: int | None) -> Version:
        """The named version (checked, not loaded); for `None`, the newest not known to be broken."""
        versions = self._candidates(name)
        if number is None:
            usable = [v for v in versions if (name, v.number) not in self._broken]
            if not usable:
                raise FailedPrecondition(f"no loadable version of model {name!r}: {self._reasons(name)}")
            return usable[-1]
        found = next((v for v in versions if v.number == number), None)
        if found is None:
            found = next((v for v in self.scan(force=True).versions.get(name, []) if v.number == number), None)
        if found is None:
            for b in self._scan.broken:
                if (b.name, b.number) == (name, number):
                    raise FailedPrecondition(f"model {name!r} version {number} is broken: {b.reason}")
            raise NotFound(f"model {name!r} has no version {number}; available: {self.describe()}")
        if (name, number) in self._broken:
            raise FailedPrecondition(f"model {name!r} version {number} is broken: {self._broken[name, number][1]}")
        return found

    # -- loading --------------------------------------------------------------------------------------------
    def peek(self, name: str, number: int | None) -> LoadedModel | None:
        """The loaded model if serving it needs no disk access now (lock-free: safe on an event loop)."""
        if time.monotonic() - self._scanned_at > self.refresh_seconds:
            return None
        if number is None:
            return self._defaults.get(name)
        entry = self._loaded.get((name, number))
        return None if entry is None else entry[1]

    def get(self, name: str, number: int | None = None) -> LoadedModel:
        """The loaded model; for `None` the newest loadable one, marking broken ones on the way."""
        if number is not None:
            return self._load(self.resolve(name, number))
        while True:
            version = self.resolve(name, None)  # FailedPrecondition when none is left
            resolved_in = self._scan
            try:
                model = self._load(version)
            except FailedPrecondition:
                continue  # marked broken: the next older one
            except NotFound:
                continue  # removed since the scan: the next scan no longer lists it
            if self._scan is resolved_in:  # a scan meanwhile (a newer version?) cleared the defaults: not undone
                self._defaults[name] = model
            return model

    def _load(self, version: Version) -> LoadedModel:
        key = (version.name, version.number)
        entry = self._loaded.get(key)
        if entry is not None:
            return entry[1]
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one load of a version at a time; those waiting for it take its result
            with self._lock:
                entry = self._loaded.get(key)
                if entry is not None:
                    self._loaded.move_to_end(key)
                    return entry[1]
                if key in self._broken:
                    raise FailedPrecondition(f"model {key[0]!r} version {key[1]} is broken: {self._broken[key][1]}")
            try:
                entry = self._read(version)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
        return entry[1]

    def _read(self, version: Version) -> tuple[Fingerprint, LoadedModel]:
        """Loads `version` (outside _lock) and files the result: the loaded model, or the version marked
        broken with its reason."""
        key = (version.name, version.number)
        fingerprint: Fingerprint | None = None
        try:
            fingerprint = version.fingerprint()
            model = load(version, self.runtime, self.threads, self.precision)
        except (MemoryError, RuntimeUnavailable) as exc:  # not the version's fault, not for ever: not marked broken
            raise ResourceExhausted(f"model {key[0]!r} version {key[1]} cannot be loaded now: "
                                    f"{broken_reason(exc)}; it is tried again on the next request") from None
        except Exception as exc:  # noqa: BLE001 - a version that cannot load is unusable, not fatal
            if isinstance(exc, FileNotFoundError) and not (version.path / MANIFEST).exists():
                # removed since the scan, the folder or its manifest (rm -r takes the files first): not
                # broken, gone (a default resolution looks again)
                self._scanned_at = float("-inf")
                raise NotFound(f"model {key[0]!r} version {key[1]} was removed") from None
            reason = broken_reason(exc)
            with self._lock:
                self._broken[key] = (_identity(version, fingerprint), reason)
                self._warn_once(str(version.path), f"model version {version} is broken: {reason}")
            raise FailedPrecondition(f"model {key[0]!r} version {key[1]} is broken: {reason}") from None
        log.info("loaded %s on %s", version, model.runtime.name)
        entry = (fingerprint, model)
        with self._lock:
            self._loaded[key] = entry
            self._verified[key] = (fingerprint, label(model.runtime))
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
        return entry

    def preload(self, stopped: Callable[[], bool] = lambda: False) -> None:
        """Loads the default version of every model, so that the first requests need no disk; checks `stopped`
        before each, so that a shutdown waits for one model's load at most, not the repository's (SIGTERM right
        after the start over 60 models took 5.2 s to exit, 0.1 s with the check)."""
        for name in self.scan(force=True).versions:
            if stopped():
                return
            try:
                self.get(name)
            except (FailedPrecondition, ResourceExhausted) as exc:
                log.warning("not preloaded: %s", exc)

    # -- describing -----------------------------------------------------------------------------------------
    def summaries(self) -> list[ModelSummary]:
        """Every model, by name: those with a version that reads described by their default one; those whose
        every version is broken already at the scan (no manifest reads) with version 0, no kind or shapes,
        and the reasons. Left out, such a model was in no listing while its calls answered FAILED_PRECONDITION
        naming the reasons; a listing is where an operator looks for them."""
        scan = self.scan(force=True)
        described = {name: self._summary(name, scan) for name in scan.versions}
        for b in scan.broken:
            if b.name not in scan.versions:
                lost = described.setdefault(b.name, ModelSummary(b.name, 0, [], "", 0, ()))
                if lost is not None:
                    lost.broken[b.number] = b.reason
        return [s for _, s in sorted(described.items()) if s is not None]

    def _summary(self, name: str, scan: Scan) -> ModelSummary | None:
        """One model of the listing, described by its default version. Read from the listing's own `scan`: the
        loads on the way may scan again (another call's scan too), and a model removed meanwhile made the
        whole listing fail (NOT_FOUND, or KeyError from the newer snapshot); it is left out instead (None)."""
        try:
            manifest, number, runtime = self._described(name, scan)
        except FailedPrecondition:  # no version loads: described by its newest, with version 0
            manifest, number, runtime = scan.versions[name][-1].manifest, 0, ""
        except NotFound:  # removed since the listing's scan
            return None
        broken = {n: reason for (m, n), (_, reason) in list(self._broken.items()) if m == name}
        broken.update({b.number: b.reason for b in scan.broken if b.name == name})
        return ModelSummary(
            name=name,
            number=number,
            numbers=[v.number for v in scan.versions[name] if v.number not in broken],
            kind=manifest.kind, latent_dim=manifest.latent_dim, image_shape=manifest.image_shape,
            metrics=manifest.numeric_metrics(), broken=dict(sorted(broken.items())), runtime=runtime,
        )

    def _described(self, name: str, scan: Scan) -> tuple[Manifest, int, str]:
        """The default version's manifest, number and runtime label. The newest version not known broken is
        the default when it has loaded before and its files are the same (`_verified`): described without a
        load. Loading every model for each listing, over more models than `max_loaded`, reloaded them all
        each time (an LRU visited in a cycle always misses), hashing every file and evicting the models that
        the requests were using."""
        usable = [v for v in scan.versions[name] if (name, v.number) not in self._broken]
        known = self._verified.get((name, usable[-1].number)) if usable else None
        if usable and known is not None:
            return usable[-1].manifest, usable[-1].number, known[1]
        try:
            model = self.get(name)
        except ResourceExhausted:  # too big for the memory left now: described by its manifest, not loaded
            default = (usable or scan.versions[name])[-1]
            return default.manifest, default.number, ""
        return model.manifest, model.number, label(model.runtime)

    def loaded(self) -> list[LoadedModel]:
        """The model versions held in memory now (for metrics)."""
        return [model for _, model in list(self._loaded.values())]

    def broken(self) -> dict[tuple[str, int], str]:
        """Every version known to be broken, with the reason: found so by the scan or by loading."""
        out = {key: reason for key, (_, reason) in list(self._broken.items())}
        out.update({(b.name, b.number): b.reason for b in self._scan.broken})
        return out

    def _reasons(self, name: str) -> str:
        return _listed_reasons([(n, reason) for (m, n), (_, reason) in sorted(list(self._broken.items()))
                                if m == name])

    def _warn_once(self, where: str, message: str) -> None:
        if (where, message) not in self._logged:
            self._logged.add((where, message))
            # control characters escaped: a folder named "3\nINFO aevae.store: loaded ..." wrote a line of its own
            log.warning("%s", CONTROL.sub(lambda m: repr(m.group())[1:-1], message))


def _identity(version: Version, fingerprint: Fingerprint | None = None) -> Identity:
    """The version's files (`fingerprint`, default: as they are now) and the checksums its manifest lists.
    A failed load is marked for the fingerprint taken before it: the files it found. Taken after, a folder
    replaced during the load by a good copy (rm -r and cp -r, rsync --delete) had the mark made for that
    copy, so no scan lifted it and the version stayed broken for good."""
    return fingerprint or _fingerprint(version), tuple(sorted(version.manifest.files.items()))


def _fingerprint(version: Version | None) -> Fingerprint | None:
    if version is None:
        return None
    try:
        return version.fingerprint()
    except OSError:
        return None


LISTED_REASONS = 3  # of a model's broken versions, the reasons an error names


def _listed_reasons(reasons: list[tuple[int, str]]) -> str:
    """`version 1: why; version 2: why`, of the first LISTED_REASONS versions and a count of the rest. With
    every reason, a model of 1,000 broken versions made an error past gRPC's 16 KiB of metadata, and its
    callers got RESOURCE_EXHAUSTED about metadata instead of FAILED_PRECONDITION."""
    shown = "; ".join(f"version {n}: {reason}" for n, reason in sorted(reasons)[:LISTED_REASONS])
    more = len(reasons) - LISTED_REASONS
    return shown if more <= 0 else f"{shown}; and {more} more broken versions"


def broken_reason(exc: Exception) -> str:
    """Why a version failed to load, without absolute server paths; never empty: an exception without a message
    (MemoryError(), whose str is "") is named by its type, not logged as "cannot be loaded now: ;"."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if isinstance(exc, OSError) and exc.strerror:  # the file's name, not its folders
        text = f"{Path(str(exc.filename)).name}: {exc.strerror}" if exc.filename else exc.strerror
    text = re.sub(r"(/[^\s/'\"]+)+/", "", text)[:300].strip()  # file names stay, folders go
    return text or type(exc).__name__
