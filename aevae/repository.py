"""The model repository on disk: `<root>/<name>/<number>/{manifest.json, weights.pt, latent_stats.json, ...}`.

Disk work only: listing versions and writing them atomically. Loading, checksum verification and the
broken-version policy live in `aevae.store`; this module imports neither torch nor the model runtime.

- A version appears atomically: it is written into a hidden folder beside its siblings and renamed into
  place, so a reader never sees half of one; its files reach the disk (fsync) before the rename, and the
  rename before the version is reported written, so a crash or power cut after that loses nothing. What a
  writer that was killed left (its hidden folder, a file it was adding) is removed by the next writer of that
  model, once it is an hour old.
- Version numbers are canonical decimal folder names from 1 to 2**63 - 1 ("002" or "1e3" are not versions);
  they are never reused: a high-water mark per model survives deleting the newest version, so a client
  pinned to a number never silently gets other weights.
- A version folder or file that resolves outside the repository root (a symlink) is broken unless the
  repository is opened with `allow_symlinks=True`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Collection, Iterable, Iterator, Mapping

from aevae.manifest import FILE_NAME as MANIFEST
from aevae.manifest import Manifest, ManifestError, json_default

MODELS_DIR_ENV = "AEVAE_MODELS_DIR"
WEIGHTS = "weights.pt"
STATS = "latent_stats.json"
HIGH_WATER = ".high-water"
HIGH_WATER_LOCK = ".high-water.lock"  # updates of a model's high-water mark take turns on this file
ADD_FILES_LOCK = ".add-files.lock"  # files added to a model's versions (add_files) take turns on this file
MANIFEST_MAX_BYTES = 1 << 20  # a manifest is a few KiB (its latent statistics live in their own file)
# latent_stats.json: about 0.2 MiB for a 4-d latent, growing by ~3 KiB per dimension; read whole and kept in
# memory per loaded version, so a bigger one (a damaged or hostile file, checksummed or not) is refused.
STATS_MAX_BYTES = 16 << 20
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
NAME_RULE = "1 to 64 of a-z, 0-9, '_', '.', '-', starting with a letter or a digit"
NUMBER_PATTERN = re.compile(r"^[1-9][0-9]{0,18}$")
MAX_NUMBER = 2**63 - 1  # what the wire's int64 holds
STAGING_PREFIX = ".incoming-"
# A version is written into its hidden folder in about a second (its files are made before the folder is);
# one an hour old was left by a writer that was killed (SIGKILL, a power cut) and is removed by the next writer.
STALE_SECONDS = 3600.0

log = logging.getLogger(__name__)

FileWriter = Callable[[Path], None]


def models_dir(value: str | os.PathLike[str] | None = None) -> Path:
    """--models-dir wins, then AEVAE_MODELS_DIR, then ./models. An empty --models-dir (`--models-dir "$UNSET"`)
    is refused: taken as "not given", it trained into, and served, ./models of wherever the command ran."""
    if value is not None and not str(value).strip():
        from aevae.errors import UserError

        raise UserError(f"--models-dir is empty; pass a folder, or leave it out for ${MODELS_DIR_ENV} or ./models")
    path = Path(value or os.environ.get(MODELS_DIR_ENV) or "models").expanduser()
    try:
        path.stat()
    except OSError as exc:  # a symlink loop (ELOOP) made every command end in Path.resolve's traceback
        if exc.errno == errno.ELOOP:
            from aevae.errors import UserError

            raise UserError(f"the model repository {path} (--models-dir or {MODELS_DIR_ENV}) is a loop of "
                            "symbolic links; pass a folder") from None
    return path


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading, refusing anything but a regular file (ValueError). A FIFO put in place of a
    version's file made a plain open wait for a writer, for ever, and a load waits with the store's lock held:
    every call of every model waited with it. Opened without blocking, then looked at (fstat) before a read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path.name} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_number(folder_name: str) -> int | None:
    """The version number a folder name stands for, or None when it is not a canonical version name."""
    if not NUMBER_PATTERN.fullmatch(folder_name):  # `$` also matches before a final newline
        return None
    number = int(folder_name)
    return number if number <= MAX_NUMBER else None


@dataclass(frozen=True)
class Version:
    """A complete version on disk, with its manifest parsed and checked (its files are not yet verified)."""

    name: str
    number: int
    path: Path
    manifest: Manifest

    def file(self, name: str) -> Path:
        return self.path / name

    def latent_stats(self) -> dict[str, Any]:
        """The parsed file; ValueError when it is over STATS_MAX_BYTES (before reading it), does not match the
        checksum the manifest lists for it, or is not JSON. Checked here, on the bytes parsed: the file is read
        when first asked for, after the load checked it, and could have been replaced in between."""
        with open_regular(self.file(STATS)) as f:
            data = f.read(STATS_MAX_BYTES + 1)
        if len(data) > STATS_MAX_BYTES:
            raise ValueError(f"{STATS} is over {STATS_MAX_BYTES >> 20} MiB; latent statistics are a few hundred KiB")
        listed = self.manifest.files.get(STATS)
        if listed is not None and hashlib.sha256(data).hexdigest() != listed:
            raise ValueError(f"{STATS} does not match the checksum in its manifest (changed since it was checked)")
        try:
            return json.loads(data)
        except RecursionError:  # not a ValueError: it failed the call as an internal error
            raise ValueError(f"{STATS} is nested too deeply to be read") from None

    def check_files(self) -> None:
        """Every listed file against its checksum, each streamed (none read whole): ValueError naming the first
        that does not match; OSError as reading raised it (FileNotFoundError for one gone). The one check of a
        version's files, for its load (aevae.inference.load) and for `aevae export-onnx`'s account of it."""
        for name, expected in self.manifest.files.items():
            if sha256_file(self.file(name)) != expected:
                raise ValueError(f"{name} does not match the checksum in its manifest (truncated or altered)")

    def verified(self, name: str) -> bytes:
        """The listed file's bytes, checked against the checksum its manifest lists: what a runtime loads is
        what was checked. Checking the file by its path and then loading it by its path again let a file
        replaced in between (a copy over it in place) be loaded and served unchecked, under the version's
        label, until the next scan. ValueError when the file is not listed or does not match."""
        listed = self.manifest.files.get(name)
        if listed is None:
            raise ValueError(f"{name} is not listed in {MANIFEST}, so it cannot be checked")
        with open_regular(self.file(name)) as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != listed:
            raise ValueError(f"{name} does not match the checksum in its manifest (truncated or altered)")
        return data

    def fingerprint(self) -> tuple[tuple[str, int, int, int, int], ...]:
        """(file, size, mtime, ctime, inode) of the manifest and every listed file: changes when any is
        replaced, rewritten or deleted, even by a writer that restores its size and modification time (the
        change time cannot be set back). OSError when a file is gone."""
        out = []
        for name in (MANIFEST, *sorted(self.manifest.files)):
            st = os.stat(self.file(name))
            out.append((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        return tuple(out)

    def __str__(self) -> str:
        return f"{self.name}/{self.number}"


REASON_MAX = 300  # characters of a broken version's reason, as aevae.store.broken_reason cuts a load's


def _bounded(reason: str) -> str:
    """A reason cut to REASON_MAX characters. A manifest's reason quotes the value it refuses: an image_shape
    of 100,000 numbers made a reason of 0.7 MB, which failed ListModels past --max-message-bytes and the call
    asking for the version past gRPC's 16 KiB of metadata (RESOURCE_EXHAUSTED, not the reason), and was
    logged whole."""
    return reason if len(reason) <= REASON_MAX else f"{reason[:REASON_MAX - 3]}..."


def _plain(filename: str) -> bool:
    """A file name of the version's own folder: no path, nothing special."""
    return filename not in ("", ".", "..") and "/" not in filename and "\x00" not in filename


def _is_dir(path: Path) -> bool:
    """Path.is_dir, with any error (a folder removed meanwhile, no permission to look) as "not a folder"."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _why(exc: OSError) -> str:
    """An OSError in words for a reason clients see: what went wrong and on which file of the version, not
    the server's absolute paths."""
    name = Path(exc.filename).name if exc.filename else ""
    return f"{exc.strerror or type(exc).__name__}" + (f" ({name})" if name else "")


# A manifest as a scan read it: (device, inode, size, mtime, ctime). Edited in place, replaced, chmod-ed or
# removed, its stat changes; a file system keeps times in coarse ticks, so only a stat this much older than
# the scan is trusted to stand for the bytes read (one newer is read again).
ManifestStat = tuple[int, int, int, int, int]
SETTLED_NS = 2_000_000_000


@dataclass(frozen=True)
class BrokenVersion:
    name: str
    number: int
    path: Path
    reason: str


@dataclass
class Scan:
    """What one look at the repository found: complete versions by name (ascending), and the broken ones."""

    versions: dict[str, list[Version]] = field(default_factory=dict)
    broken: list[BrokenVersion] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)  # folders in a model that are no version: why

    def describe(self, root: Path, leave_out: Collection[tuple[str, int]] = ()) -> str:
        """`ae: 1, 2; vae: 1` - what exists, for error messages. Bounded: at most DESCRIBED_MODELS models, and
        of a model's versions the first and the last few with their count, so that the NOT_FOUND status of a
        repository with thousands of versions stays under gRPC's 16 KiB of metadata (past it the client got
        RESOURCE_EXHAUSTED about metadata instead of the status)."""
        if not self.versions:
            if not root.exists():
                return f"no models: {root} does not exist (yet; train some with `aevae train`)"
            if not root.is_dir():
                return f"no models: {root} is a file, not a folder (--models-dir names the repository's folder)"
            # why nothing is served, when the scan knows: "no models" alone sent the operator of a folder the
            # service may not read (its permissions, a container's uid) off to train
            unreadable = [why for path, why in self.ignored if path == root or path.parent == root]
            if unreadable:
                return f"no models readable in {root}: {unreadable[0]}" + (
                    f" (and {len(unreadable) - 1} more folders)" if len(unreadable) > 1 else "")
            if self.broken:
                first = self.broken[0]
                return (f"no loadable model in {root}: {len(self.broken)} broken version(s), e.g. "
                        f"{first.name}/{first.number}: {first.reason}")
            return f"no models in {root} (train some with `aevae train`)"
        served = {n: [v for v in vs if (n, v.number) not in leave_out] for n, vs in self.versions.items()}
        names = [n for n, vs in served.items() if vs]
        shown = "; ".join(f"{n}: {_numbers(served[n])}" for n in names[:DESCRIBED_MODELS]) or "no loadable version"
        more = len(names) - DESCRIBED_MODELS
        return shown if more <= 0 else f"{shown}; and {more} more models"


DESCRIBED_MODELS = 20
DESCRIBED_ENDS = 3  # versions shown at each end of a long list


def _numbers(versions: list["Version"]) -> str:
    numbers = [str(v.number) for v in versions]
    if len(numbers) <= 2 * DESCRIBED_ENDS + 1:
        return ", ".join(numbers)
    return (f"{', '.join(numbers[:DESCRIBED_ENDS])}, ..., {', '.join(numbers[-DESCRIBED_ENDS:])} "
            f"({len(numbers)} versions)")


class ModelRepository:
    """Reads and writes the repository at `root`. Cheap to create; every call looks at the disk anew (a scan
    parses again only the manifests whose stat changed since this instance last read them)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, allow_symlinks: bool = False):
        self.root = models_dir(root)
        self.allow_symlinks = allow_symlinks
        # Each manifest the last scan parsed (or why it is no manifest), under its stat then: a scan parses
        # again only the manifests that changed. With each manifest parsed and each file's path resolved
        # component by component anew, a scan of 3,000 versions took 1 s of CPU, paid by ListModels (which
        # scans) and by every request for a version number that does not exist.
        self._manifests: dict[Path, tuple[ManifestStat, Manifest | str]] = {}

    def ensure_writable(self, names: Iterable[str] = (), needed_bytes: int = 0) -> None:
        """Raises UserError now when versions of the models `names` could not be written here (a file in the
        way, no permission, a read-only mount, /proc, less free space than `needed_bytes`, a model whose next
        number would be past MAX_NUMBER), rather than after the minutes of training that would produce them.
        Permission bits say nothing for root or a read-only mount, so this writes: it makes the
        missing folders down to each model's folder (the root's, with no names) and a temporary file there,
        then removes what it made, so that a run that fails later leaves no empty repository behind. A
        temporary file of no bytes is created even on a full disk, hence the separate free-space check."""
        from aevae.errors import UserError

        for folder in [self.root / name for name in names] or [self.root]:
            existing = folder
            while not existing.exists() and existing != existing.parent:
                existing = existing.parent
            if not existing.is_dir():
                raise UserError(f"cannot write model versions under {self.root}: {existing} is a file, not a "
                                "folder; pass --models-dir (or set AEVAE_MODELS_DIR) to a folder you can write")
            made: list[Path] = []
            try:
                for parent in reversed([folder, *folder.parents]):
                    if not parent.exists():
                        parent.mkdir()
                        made.append(parent)
                with tempfile.TemporaryFile(dir=folder):
                    pass
                free = shutil.disk_usage(folder).free
                if free < needed_bytes:
                    raise UserError(f"cannot write model versions under {self.root}: they need about "
                                    f"{_mib(needed_bytes)}, and {_mib(free)} is free there; free some space or "
                                    "pass --models-dir (or set AEVAE_MODELS_DIR) to a folder with more")
                if folder != self.root and self._next_number(folder) > MAX_NUMBER:
                    raise UserError(f"cannot write a version of {folder.name} under {self.root}: its next number "
                                    f"would be past {MAX_NUMBER} (see {folder / HIGH_WATER} and its version "
                                    "folders); write under another --name or --models-dir")
            except OSError as exc:
                where = f"{exc.filename}: " if exc.filename else ""
                raise UserError(f"cannot write model versions under {self.root}: {where}{exc.strerror or exc}; "
                                "pass --models-dir (or set AEVAE_MODELS_DIR) to a folder you can write") from None
            finally:
                for path in reversed(made):
                    try:
                        path.rmdir()
                    except OSError:
                        pass

    def scan(self) -> Scan:
        """What the repository holds now. A folder that cannot be read (its permissions, or removed while
        this looks) costs only itself: an unreadable version is broken with the reason, an unreadable model
        folder (or root) is ignored with it, and every other model is found as usual."""
        scan = Scan()
        seen: set[Path] = set()  # the manifests of the versions this scan looked at
        try:
            if not self.root.is_dir():
                return scan
            root = self.root.resolve()
            # fullmatch: `$` also matches before a final newline, and a folder "vae\n" was served as a model
            folders = [p for p in self.root.iterdir() if not p.name.startswith(".") and _is_dir(p)]
            model_dirs = sorted(p for p in folders if NAME_PATTERN.fullmatch(p.name))
        except OSError as exc:
            scan.ignored.append((self.root, f"the repository cannot be read: {_why(exc)}"))
            return scan
        # said once in the log: a folder "VAE" was left out without a word, and calls for it were NOT_FOUND
        scan.ignored += [(p, f"a model folder is named by {NAME_RULE}") for p in folders
                         if not NAME_PATTERN.fullmatch(p.name)]
        for model_dir in model_dirs:
            try:
                entries = list(model_dir.iterdir())
            except FileNotFoundError:
                continue  # removed since the root was listed
            except OSError as exc:
                scan.ignored.append((model_dir, f"the model folder cannot be read: {_why(exc)}"))
                continue
            found = []
            for entry in entries:
                number = version_number(entry.name)
                if number is None:  # hidden entries are the writer's own (staging, the high-water mark)
                    if not entry.name.startswith(".") and (entry.name[:1].isdigit() or _is_dir(entry)):
                        scan.ignored.append((entry, "a version folder is named by a decimal number from 1 to "
                                                    "2**63-1 with no leading zeros"))
                    continue
                if not _is_dir(entry):  # a file, or a symlink to nothing usable: said once in the log
                    if os.path.lexists(entry):
                        scan.ignored.append((entry, "a symlink that leads to no folder (missing, or a loop)"
                                             if entry.is_symlink() else "a file, not a version folder"))
                    continue
                try:
                    seen.add(entry / MANIFEST)
                    found.append(self._check(model_dir.name, number, entry, root))
                except FileNotFoundError:
                    continue  # removed while this looked: gone, not broken
                except (ValueError, OSError) as reason:
                    why = _why(reason) if isinstance(reason, OSError) else str(reason)
                    scan.broken.append(BrokenVersion(model_dir.name, number, entry, _bounded(why)))
            if found:
                scan.versions[model_dir.name] = sorted(found, key=lambda v: v.number)
        # what no longer is a version's manifest is forgotten (list(): another thread's scan may add some)
        self._manifests = {path: known for path, known in list(self._manifests.items()) if path in seen}
        return scan

    def _check(self, name: str, number: int, path: Path, root: Path) -> Version:
        """Raises ValueError with the reason when the version is incomplete or inconsistent."""
        manifest = self._manifest(path / MANIFEST)
        # In a folder that is no symlink, in a model folder that is none, a file of a plain name that is no
        # symlink is inside the root: one lstat tells, where resolving the path takes one per component.
        inside = not os.path.islink(path) and not os.path.islink(path.parent) and path.parent.parent == self.root
        for filename in (MANIFEST, *manifest.files):
            if inside and _plain(filename):
                try:
                    mode = os.lstat(os.path.join(path, filename)).st_mode
                except FileNotFoundError:
                    raise ValueError(f"no {filename}") from None
                except OSError:
                    mode = None  # told below, as before
                if mode is not None and not stat.S_ISLNK(mode):
                    if not stat.S_ISREG(mode):
                        raise ValueError(f"no {filename}")
                    continue
            file = path / filename
            try:
                target = file.resolve()
            except (OSError, RuntimeError) as exc:  # a symlink loop: RuntimeError before Python 3.13
                # the reason alone: clients see it, and Python's words for a loop name the server's path
                why = _why(exc) if isinstance(exc, OSError) else "a loop of symbolic links"
                raise ValueError(f"{filename} cannot be resolved: {why}") from None
            if not self.allow_symlinks and not target.is_relative_to(root):
                raise ValueError(f"{filename} resolves outside the repository root (a symlink); "
                                 "open the repository with allow_symlinks to serve it")
            if not file.is_file():
                raise ValueError(f"no {filename}")
        if (manifest.name, manifest.number) != (name, number):  # as written, they are the folder's
            manifest = manifest.with_(name=name, number=number)
        return Version(name=name, number=number, path=path, manifest=manifest)

    def _manifest(self, path: Path) -> Manifest:
        """The parsed manifest at `path`; ValueError with the reason when there is none or it is no manifest.
        A manifest whose stat is as when it was last read is not read again; what reading it gave is kept
        once its stat has settled (see ManifestStat)."""
        try:
            st = path.stat()
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # as the version's other files say it
                raise ValueError(f"{MANIFEST} cannot be resolved: a loop of symbolic links") from None
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EBADF):  # as Path.is_file
                raise ValueError(f"no {MANIFEST}") from None
            raise
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"no {MANIFEST}")
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        known = self._manifests.get(path)
        if known is not None and known[0] == key:
            outcome = known[1]
        else:
            try:
                with open_regular(path) as f:
                    text = f.read(MANIFEST_MAX_BYTES + 1)
            except OSError as exc:  # not kept: the error may pass (a descriptor limit, an I/O error)
                raise ValueError(f"unreadable {MANIFEST}: {exc.strerror}") from None
            if len(text) > MANIFEST_MAX_BYTES:
                outcome = f"{MANIFEST} is over {MANIFEST_MAX_BYTES} bytes; a manifest is a few KiB"
            else:
                try:
                    outcome = Manifest.loads(text.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    outcome = f"unreadable {MANIFEST}: {exc}"
                except ManifestError as exc:
                    outcome = str(exc)
        if known is None or known[0] != key:
            if max(st.st_mtime_ns, st.st_ctime_ns) < time.time_ns() - SETTLED_NS:
                self._manifests[path] = (key, outcome)
            else:
                self._manifests.pop(path, None)
        if isinstance(outcome, str):
            raise ValueError(outcome)
        return outcome

    def versions(self) -> dict[str, list[Version]]:
        return self.scan().versions

    def describe(self) -> str:
        return self.scan().describe(self.root)

    def write(self, name: str, manifest: Manifest, writers: Mapping[str, FileWriter]) -> Version:
        """Writes the next version atomically and returns it. `writers` maps a file name to a function that
        writes that file at the path it is given; every file is checksummed into the manifest. Concurrent
        writers each get their own number."""
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"model name {name!r} must match {NAME_PATTERN.pattern}")
        model_dir = self.root / name
        made = not model_dir.exists()
        model_dir.mkdir(parents=True, exist_ok=True)
        remove_stale(model_dir)
        staging = _make_staging(model_dir)
        try:
            for filename, write in writers.items():
                write(staging / filename)
                fsync_path(staging / filename)
            manifest = manifest.with_(name=name, files={f: sha256_file(staging / f) for f in writers})
            while True:
                number = self._next_number(model_dir)
                if number > MAX_NUMBER:  # its folder would be no version: written, then never listed
                    raise ValueError(f"{name}'s next version number would be {number}, past {MAX_NUMBER}")
                (staging / MANIFEST).write_text(manifest.with_(number=number).dumps())
                fsync_path(staging / MANIFEST)
                fsync_path(staging)
                target = model_dir / str(number)
                try:
                    os.rename(staging, target)  # fails if another writer took the number first
                except OSError:
                    if target.exists():
                        continue
                    raise
                fsync_path(model_dir)
                try:
                    self._set_high_water(model_dir, number)
                except OSError as exc:  # the version is complete and in place: reported written, as it is
                    log.warning("%s/%d written, but its high-water mark could not be raised: %s", name, number, exc)
                return self._check(name, number, target, self.root.resolve())
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if made:  # the model's first version failed (a full disk): no empty folder left for it
                with contextlib.suppress(OSError):  # not empty: another writer's version is in it now
                    model_dir.rmdir()
            raise

    def add_files(self, version: Version, writers: Mapping[str, FileWriter], **manifest_changes: Any) -> Version:
        """Adds files to an existing version (e.g. the ONNX graphs of one written before): each is written
        under a temporary name and renamed into place, then the manifest that lists them replaces the old one
        atomically. The files it already lists are left as they are.

        Writers of one model take turns (a lock in the model's folder) and each reads the manifest anew under
        it, so two commands adding the same files cannot remove each other's: the second finds them listed and
        adds nothing. Whatever stops the call (a full disk, a Ctrl-C or SIGTERM), what it leaves is decided by
        the manifest on disk: one that does not list the new files yet gets none of them left behind (the
        version is as it was); once the new manifest is in place nothing is removed (the files it lists are
        there). Told by reading the manifest, not by a flag set after the rename: a KeyboardInterrupt is
        raised right after the rename returns, before any next statement, and with a flag it removed the
        files a manifest already listed, leaving the version broken for good."""
        clash = sorted(set(writers) & {MANIFEST})
        if clash:
            raise ValueError(f"{version} cannot be given another {MANIFEST}")
        with _locked(version.path.parent / ADD_FILES_LOCK):
            version = self._check(version.name, version.number, version.path, self.root.resolve())
            todo = {name: write for name, write in writers.items() if name not in version.manifest.files}
            if not todo:
                return version
            remove_stale(version.path)
            token = secrets.token_hex(6)  # the temporaries of two writers never clash
            checksums: dict[str, str] = {}
            tmp: Path | None = None  # the temporary of the file being written
            placed: list[Path] = []  # renamed into place (or about to be), not yet listed
            try:
                for filename, write in todo.items():
                    tmp = version.path / _adding(filename, token)
                    write(tmp)
                    fsync_path(tmp)
                    checksums[filename] = sha256_file(tmp)
                    placed.append(version.path / filename)  # before the rename: an interrupt right after it
                    os.replace(tmp, version.path / filename)
                changes = dict(manifest_changes)
                if "runtimes" in changes:
                    changes["runtimes"] = {**version.manifest.runtimes, **changes["runtimes"]}
                manifest = version.manifest.with_(files={**version.manifest.files, **checksums}, **changes)
                _swap_manifest(version.path, manifest, token)
            except BaseException:  # a full disk, a stop: no file of this call stays unlisted
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
                if not (checksums and _lists(version.path, checksums)):
                    for path in placed:
                        path.unlink(missing_ok=True)
                raise
            return self._check(version.name, version.number, version.path, self.root.resolve())

    def amend_manifest(self, version: Version, change: Callable[[Manifest], Manifest | None]) -> Version | None:
        """Rewrites a version's manifest, its files left byte for byte as they are (e.g. the test-set figures
        `aevae export-onnx` measures for graphs a version already has). `change` is given the manifest as it
        is now, read anew under the model's add-files lock (the one add_files takes), and returns the manifest
        to write, or None when there is nothing to do: what another writer recorded meanwhile is seen, never
        replaced by a stale copy. Swapped atomically, as add_files swaps it; the new version, or None when
        nothing was written. ValueError when `change` alters `files`: a file and its checksum are added by
        add_files only, which writes the file first."""
        with _locked(version.path.parent / ADD_FILES_LOCK):
            current = self._check(version.name, version.number, version.path, self.root.resolve())
            manifest = change(current.manifest)
            if manifest is None:
                return None
            if manifest.files != current.manifest.files:
                raise ValueError(f"{version}: amend_manifest leaves the files and their checksums as they are; "
                                 "add files with add_files")
            _swap_manifest(current.path, manifest, secrets.token_hex(6))
            return self._check(version.name, version.number, version.path, self.root.resolve())

    def _next_number(self, model_dir: Path) -> int:
        """One past the high-water mark and every version folder's number (1 for a model not yet there)."""
        if not model_dir.is_dir():
            return 1
        return 1 + max(self._high_water(model_dir), *self._numbers(model_dir), 0)

    @staticmethod
    def _numbers(model_dir: Path) -> list[int]:
        return [n for n in (version_number(p.name) for p in model_dir.iterdir()) if n is not None]

    @staticmethod
    def _high_water(model_dir: Path) -> int:
        try:
            return int((model_dir / HIGH_WATER).read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _set_high_water(self, model_dir: Path, number: int) -> None:
        """Raises the mark to `number`, never lowers it. Under the model's lock: two writers finishing together
        (numbers 5 and 6) could otherwise both read 4, and the one writing 5 replace the 6 last, so that 6
        would be given out again once its folder was deleted."""
        with _locked(model_dir / HIGH_WATER_LOCK):
            if number <= self._high_water(model_dir):
                return
            tmp = model_dir / f"{HIGH_WATER}-{secrets.token_hex(8)}"
            try:
                with _create(tmp) as f:
                    f.write(f"{number}\n".encode())
                fsync_path(tmp)
                os.replace(tmp, model_dir / HIGH_WATER)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise


def _mib(size: int) -> str:
    return f"{size / (1 << 20):,.1f} MiB"


def _create(path: Path) -> BinaryIO:
    """A new file opened for writing, with the permissions an ordinary file gets (0o666 less the umask), where
    tempfile.mkstemp would make it 0o600."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")


def fsync_path(path: Path) -> None:
    """Flushes a file's data, or a folder's entries, to the disk: a rename can reach the disk before the data
    of the file renamed, so without this a power cut could leave a complete-looking version of empty files."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_leftover(name: str) -> bool:
    """A writer's temporary: a staging folder, a high-water mark or a file added to a version being written."""
    return name.startswith((STAGING_PREFIX, f"{HIGH_WATER}-")) or (name.startswith(".") and name.endswith(".incoming"))


def _adding(filename: str, token: str) -> str:
    """The temporary under which add_files writes `filename` (a leftover by _is_leftover's rule)."""
    return f".{filename}.{token}.incoming"


def _swap_manifest(folder: Path, manifest: Manifest, token: str) -> None:
    """Replaces the version's manifest with `manifest` atomically: written under a temporary name, flushed,
    renamed over the old one, then the folder flushed. Readers see the old manifest or the new one, whole.
    Stopped before the rename (a full disk, a Ctrl-C), the temporary goes and the old manifest stays; after
    it, the new one is in place (its temporary name is gone with the rename)."""
    tmp = folder / _adding(MANIFEST, token)
    try:
        tmp.write_text(manifest.dumps())
        fsync_path(tmp)
        os.replace(tmp, folder / MANIFEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(folder)


def _lists(folder: Path, checksums: Mapping[str, str]) -> bool:
    """Whether the version's manifest on disk lists every file of `checksums` with that checksum: after a
    failure or a stop, whether the manifest naming the files was put in place (then they must stay)."""
    try:
        with open_regular(folder / MANIFEST) as f:
            files = Manifest.loads(f.read(MANIFEST_MAX_BYTES + 1).decode("utf-8")).files
    except (OSError, ValueError):
        return False
    return all(files.get(name) == digest for name, digest in checksums.items())


def added_name(temporary: str) -> str:
    """The file a temporary of add_files was to become (`temporary` itself if it is none): what an error
    about writing it should name."""
    match = re.fullmatch(r"\.(.+)\.[0-9a-f]+\.incoming", temporary)
    return match.group(1) if match else temporary


def remove_stale(folder: Path, is_leftover: Callable[[str], bool] = _is_leftover) -> None:
    """Removes what killed writers left in `folder` (a model's or a version's; the batch jobs' output folder,
    with their own `is_leftover`): the temporaries it names, once STALE_SECONDS old (a live writer's are
    seconds old, and age needs no process table, so a writer on another machine of a shared folder is safe).
    Best effort: what cannot be removed stays."""
    cutoff = time.time() - STALE_SECONDS
    for path in folder.iterdir():
        if not is_leftover(path.name):
            continue
        try:
            if path.lstat().st_mtime > cutoff:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            log.info("removed %s, left by a writer that did not finish", path)
        except OSError as exc:
            log.warning("cannot remove %s, left by a writer that did not finish: %s", path, exc)


def _make_staging(model_dir: Path) -> Path:
    """A new hidden folder in `model_dir` for a version being written, with the permissions an ordinary folder
    gets (0o777 less the umask). tempfile.mkdtemp's would be 0o700, and renamed into place the version kept
    them: a service running as another user (the containers' 10001) then found it broken, Permission denied."""
    while True:
        staging = model_dir / f"{STAGING_PREFIX}{secrets.token_hex(8)}"
        try:
            staging.mkdir()
            return staging
        except FileExistsError:
            continue


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on `path`, created if missing, held for the block; on a file system
    without flock (some network and FUSE mounts), the block runs unlocked, as it did before there was a lock."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            log.debug("no lock on %s (%s): going on without", path, exc)
        yield
    finally:
        os.close(fd)


def json_writer(data: Any) -> FileWriter:
    """A writer for `ModelRepository.write` that stores `data` as JSON (numpy values allowed)."""

    def write(path: Path) -> None:
        path.write_text(json.dumps(data, default=json_default))

    return write

