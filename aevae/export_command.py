"""`aevae export-onnx`: the ONNX graphs, the int8 decoder and their test-set figures for versions written
before the trainer wrote them (aevae.onnx_export makes and measures them; this command finds the versions
that lack them, adds what each lacks through the repository, and says what it did, also when stopped).

The graphs and figures are reached through the `onnx_export` module at call time, so that a test can stand
in for one of them there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aevae import onnx_export
from aevae.onnx_export import DECODER, DECODER_INT8, ENCODER

# The reduced precisions whose manifest entries carry test-set figures, `runtimes[name]["test"]`.
PRECISIONS = ("int8", "bf16")


def _entry(manifest: Any, name: str) -> dict[str, Any]:
    """The manifest's runtimes entry `name`, or {} for none (or one that is no object: a hand-edited manifest)."""
    entry = manifest.runtimes.get(name)
    return entry if isinstance(entry, dict) else {}


def lacking_figures(manifest: Any) -> list[str]:
    """The reduced precisions (PRECISIONS) whose entry in the manifest has no test-set figures: a version whose
    graphs were added without test images, or written by a trainer given none."""
    return [name for name in PRECISIONS if not isinstance(_entry(manifest, name).get("test"), dict)]


GRAPHS = (ENCODER, DECODER, DECODER_INT8)  # what a version has once converted
NAMED = 10  # versions named in a stop's line before "and N more"


def register(sub: Any) -> None:
    from aevae.help_format import DefaultsFormatter

    p = sub.add_parser("export-onnx", help="add ONNX graphs (and the int8 decoder) to model versions that lack "
                                           "them (serving then needs no torch), and with --data-root the "
                                           "reduced-precision decoders' test figures to versions that lack those",
                       formatter_class=DefaultsFormatter)
    p.add_argument("models", nargs="*", metavar="NAME[/VERSION]", help="versions to convert (default: all)")
    p.add_argument("--models-dir", default=None, help="model repository (or AEVAE_MODELS_DIR; default ./models)")
    p.add_argument("--data-root", default=None, help="folder holding MNIST/raw/ (or AEVAE_DATA_ROOT): measure the "
                                                     "reduced-precision decoders' test-set quality, also of versions "
                                                     "that have their graphs but not these figures (else skipped)")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    """`aevae export-onnx`. Stopped by Ctrl-C or SIGTERM (Terminated), it prints one line saying which versions
    it finished and which it left as they were, then lets the stop through (main exits 130 / 143)."""
    import sys

    _require_packages()
    progress = Progress()
    try:
        return _run(args, progress)
    except KeyboardInterrupt:
        print(progress.stopped(), file=sys.stderr, flush=True)
        raise


def _run(args: Any, progress: "Progress") -> int:
    import sys

    from aevae.errors import UserError
    from aevae.repository import ModelRepository

    test_images = _test_images(getattr(args, "data_root", None))
    repository = ModelRepository(args.models_dir)
    scan = repository.scan()
    available = scan.versions
    if not available and not scan.broken:
        if scan.ignored:  # a repository or model folder it may not read: "no versions" sent its owner to train
            raise UserError(scan.describe(repository.root))
        raise UserError(f"no model versions under {repository.root.resolve()}: `aevae train` writes them")
    for path, why in scan.ignored:  # left out silently, a model it may not read looked converted, or absent
        print(f"{path}: not converted: {why}", file=sys.stderr)
    wanted = [m.split("/", 1) for m in args.models]

    def chosen(w: list[str], version: Any) -> bool:  # "name" or "name/number"
        return w[0] == version.name and (len(w) == 1 or w[1] == str(version.number))

    def selected(version: Any) -> bool:
        return not wanted or any(chosen(w, version) for w in wanted)

    unknown = [m for m, w in zip(args.models, wanted)
               if not any(chosen(w, v) for v in [*scan.broken, *(v for vs in available.values() for v in vs)])]
    if unknown:
        raise UserError(f"no such model or version: {', '.join(unknown)}; available: {scan.describe(repository.root)}")
    broken, changed = [], []
    # A version the scan already found broken (a file missing, a bad manifest) is named with its reason, as one
    # that fails to load below: left out silently, or called "no such version", it looked converted or absent.
    for gone in scan.broken:
        if selected(gone):
            print(f"{gone.name}/{gone.number}: broken: {gone.reason}", file=sys.stderr)
            broken.append(f"{gone.name}/{gone.number}")
    targets = [v for vs in available.values() for v in vs if selected(v)]
    progress.total = len(targets)
    for version in targets:
        progress.begin(version)
        try:
            _convert(repository, version, test_images, progress)
        except BrokenVersionError as exc:  # the others are still converted; the exit status says it
            print(f"{version}: {exc}", file=sys.stderr)
            broken.append(str(version))
        except ChangedMeanwhileError as exc:  # not broken: named apart, and the exit status says it too
            print(f"{version}: {exc}", file=sys.stderr)
            changed.append(str(version))
        except OSError as exc:  # a read-only or full repository: the version stays as it was
            raise UserError(progress.unwritable(repository.root, exc)) from None
        progress.end()
    print(progress.summary(test_images is not None))
    problems = [f"{len(broken)} version(s) broken, left as they are: {', '.join(broken)}"] if broken else []
    if changed:  # called broken, they sent their owner looking for damage that was another writer's change
        problems.append(f"{len(changed)} version(s) changed by another writer while measured, not measured: "
                        f"{', '.join(changed)} (run export-onnx again)")
    if problems:
        raise UserError("; ".join(problems))
    return 0


def _require_packages() -> None:
    """UserError, before any work, when torch, onnx or onnxruntime is missing (the model extra)."""
    from aevae.errors import UserError

    try:
        from aevae.runtimes import onnxruntime

        onnxruntime()
        import torch  # noqa: F401
    except ImportError as exc:
        raise UserError(f"export-onnx needs torch, onnx and onnxruntime ({exc.name} is missing): "
                        "pip install 'aevae[model]'") from None


def _test_images(data_root: str | None) -> np.ndarray | None:
    """MNIST's test images (N x 32 x 32 float32 in [0, 1]) from --data-root or AEVAE_DATA_ROOT, None when
    neither is given (the test figures are then not measured). UserError, before any version is touched,
    when the folder holds no MNIST: the message says where it looked and what the folder must hold."""
    import os

    from aevae import mnist
    from aevae.errors import UserError

    if not (data_root or os.environ.get(mnist.DATA_ROOT_ENV)):
        return None
    try:
        return mnist.load(data_root).test.floats()
    except mnist.MnistError as exc:
        raise UserError(str(exc)) from None


def _convert(repository: Any, version: Any, test_images: np.ndarray | None, progress: "Progress") -> None:
    """One version: the graphs it lacks added (add_graphs); then, given test images, the test figures its
    precision entries lack measured on its graphs as they are and recorded (record_figures). A version with
    all its graphs used to get nothing here, so one converted without --data-root could never get its
    figures but by deleting a graph. BrokenVersionError when it cannot be loaded or measured."""
    fits = test_images is not None and tuple(test_images.shape[1:]) == tuple(version.manifest.image_shape)
    images = test_images if fits else None
    if not set(GRAPHS) <= set(version.manifest.files):
        progress.changing("graphs")
        version = add_graphs(repository, version, images)
        progress.changed()
    else:
        _verify(version)
    lacking = lacking_figures(version.manifest)
    if lacking and test_images is not None and not fits:
        _say_unmeasured(version, test_images)
    if images is None or not lacking:
        if str(version) not in progress.added:
            print(f"{version}: {_what_it_has(lacking, hint=test_images is None)}")
            progress.complete.append(str(version))
        return
    progress.changing("figures")
    recorded = record_figures(repository, version, images) is not None
    progress.changed(recorded)
    if not recorded and str(version) not in progress.added:
        progress.complete.append(str(version))


def _what_it_has(lacking: list[str], hint: bool) -> str:
    if not lacking:
        return "has its ONNX graphs and test figures"
    if hint:
        return f"has its ONNX graphs (not the {' and '.join(lacking)} test figures: --data-root measures them)"
    return "has its ONNX graphs"


def _say_unmeasured(version: Any, images: np.ndarray) -> None:
    """A line saying why a version's test figures are not measured: its images are not the test images' size.
    Measured anyway, such a version failed as "broken: cannot make its graphs"."""
    import sys

    (h, w), (th, tw) = version.manifest.image_shape, images.shape[1:]
    print(f"{version}: its test figures are not measured: its images are {h} x {w}, the test images {th} x {tw}",
          file=sys.stderr)


def _verify(version: Any) -> None:
    """Every file against its checksum: a truncated version with all its graphs read as "has its graphs"."""
    from aevae.store import broken_reason

    try:
        version.check_files()
    except (OSError, ValueError) as exc:
        raise BrokenVersionError(f"broken: {broken_reason(exc)}") from None


class BrokenVersionError(ValueError):
    """The version's files fail their checksums or its weights do not load: it gets no graphs."""


class ChangedMeanwhileError(ValueError):
    """The version's files changed while its figures were measured (another writer): nothing is recorded, and
    the version is not broken; a rerun measures it as it is then."""


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def add_graphs(repository: Any, version: Any, test_images: np.ndarray | None = None) -> Any:
    """Exports and checks the graphs one version lacks, the fp32 ones and the int8 decoder, and adds them to
    it (the weights and the graphs it has stay as they are).

    The weights come through the one load path (aevae.inference.load), which verifies every file against the
    manifest's checksums first: opened directly, a truncated weights.pt surfaced as torch's own error (a
    traceback), and an altered one would have been exported into graphs that pass as the version's own.
    BrokenVersionError, with the reason, when the version cannot be loaded."""
    from aevae.inference import load
    from aevae.runtimes import torch_module
    from aevae.store import broken_reason

    try:
        model = torch_module(load(version, prefer="torch"))
    except Exception as exc:  # noqa: BLE001 - as the store: a version that cannot load is broken, with why
        raise BrokenVersionError(f"broken: {broken_reason(exc)}") from None
    files = version.manifest.files
    runtimes: dict[str, Any] = {}
    # the graphs it has (checksummed by the load above) are kept; one missing of the two is exported anew
    graphs = {name: version.file(name).read_bytes() for name in (ENCODER, DECODER) if name in files}
    new: dict[str, bytes] = {}
    try:
        if len(graphs) < 2:
            exported, runtimes["onnx"] = onnx_export.export(model)
            new = {name: data for name, data in exported.items() if name not in graphs}
            graphs = {**exported, **graphs}
        if DECODER_INT8 not in files:
            int8, entries = onnx_export.reduced_precision(graphs, model, test_images)
            new.update(int8)
            runtimes.update(entries)
    except Exception as exc:  # noqa: BLE001 - a graph it holds that ONNX cannot read, or no export within tolerance
        raise BrokenVersionError(f"broken: cannot make its graphs ({_first_line(exc)})") from None
    updated = repository.add_files(version, {name: onnx_export.bytes_writer(data) for name, data in new.items()},
                                   runtimes=runtimes)
    if any(updated.manifest.files.get(name) != hashlib.sha256(data).hexdigest() for name, data in new.items()):
        # add_files found them listed under its lock: another export-onnx added its own meanwhile, kept
        print(f"{version}: has its ONNX graphs (added meanwhile by another export-onnx)")
        return updated
    detail = f" (largest difference to torch {runtimes['onnx']['max_abs_diff']:.2g})" if "onnx" in runtimes else ""
    cost = runtimes.get("int8", {}).get("test", {}).get("bce_cost")
    detail += f", int8 decoder test BCE {cost:+.2f} nats vs fp32" if cost is not None else ""
    print(f"{version}: wrote {' and '.join(sorted(new))}{detail}")
    return updated


def record_figures(repository: Any, version: Any, test_images: np.ndarray) -> Any:
    """Measures the reduced-precision decoders of a version that has all its graphs on `test_images`, and
    records the test figures its precision entries lack in its manifest; returns the version as recorded,
    or None when another export-onnx recorded them meanwhile (nothing written).

    The graphs are measured as they are (the int8 one is not quantized anew) from bytes checked against the
    manifest's checksums, and the weights (bf16's decoder) come through the load path, which checks every
    file first. The manifest is changed by ModelRepository.amend_manifest under the model's add-files lock,
    on the manifest as it is then: a figure recorded meanwhile stays, only the ones still lacking are added
    (into the entries as they are), and the files stay byte for byte. BrokenVersionError when the version
    cannot be loaded or measured, or its files changed while it was measured."""
    from aevae.inference import load
    from aevae.runtimes import torch_module
    from aevae.store import broken_reason

    try:
        model = torch_module(load(version, prefer="torch"))
        graphs = {name: version.verified(name) for name in GRAPHS}
    except Exception as exc:  # noqa: BLE001 - as the store: a version that cannot load is broken, with why
        raise BrokenVersionError(f"broken: {broken_reason(exc)}") from None
    try:
        entries = onnx_export.precision_entries(graphs, model, test_images)
    except Exception as exc:  # noqa: BLE001 - a graph ONNX Runtime cannot run, an int8 graph far off fp32
        raise BrokenVersionError(f"broken: cannot measure its decoders ({_first_line(exc)})") from None
    measured = dict(version.manifest.files)
    recorded: list[str] = []

    def amend(current: Any) -> Any:
        if any(current.files.get(name) != digest for name, digest in measured.items()):
            raise ChangedMeanwhileError("not measured: its files changed while they were measured (another writer); "
                                     "run export-onnx again")
        recorded[:] = lacking_figures(current)
        if not recorded:
            return None
        runtimes = dict(current.runtimes)
        for name in recorded:
            entry = _entry(current, name)
            runtimes[name] = {**entry, "test": entries[name]["test"]} if entry else entries[name]
        return current.with_(runtimes=runtimes)

    updated = repository.amend_manifest(version, amend)
    if updated is None:
        print(f"{version}: has its ONNX graphs and test figures (recorded meanwhile by another export-onnx)")
        return None
    costs = ", ".join(f"{name} {entries[name]['test']['bce_cost']:+.2f} nats" for name in recorded)
    print(f"{version}: measured the {' and '.join(recorded)} decoders on {len(test_images):,} test images "
          f"(test BCE vs fp32: {costs})")
    return updated


Stamp = tuple[int, int, int, int]


def _stamp(version: Any) -> Stamp | None:
    """The version's manifest file as it is now (inode, size, modification and change times): replacing it
    (add_files, amend_manifest) changes it. None when it cannot be looked at."""
    import os

    from aevae.repository import MANIFEST

    try:
        st = os.stat(version.path / MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _names(versions: list[str]) -> str:
    shown = ", ".join(versions[:NAMED])
    return shown if len(versions) <= NAMED else f"{shown} and {len(versions) - NAMED} more"


@dataclass
class Progress:
    """What one `export-onnx` run has done so far, version by version: for its closing line, and for the line
    a stop prints. Stopped (Ctrl-C, SIGTERM) over many versions, it exited 130 or 143 without a word, and
    its user could not tell which versions were converted and which were left as they were."""

    total: int = 0  # the versions to look at, once the repository is scanned
    added: list[str] = field(default_factory=list)  # versions given their graphs
    measured: list[str] = field(default_factory=list)  # versions given their test figures
    complete: list[str] = field(default_factory=list)  # versions that needed nothing
    reached: int = 0
    current: Any = None  # the version being looked at, between begin and end
    change: str | None = None  # "graphs" or "figures" while that change of `current` is being made
    stamp: Stamp | None = None  # `current`'s manifest as that change began

    def begin(self, version: Any) -> None:
        self.current, self.change = version, None
        self.reached += 1

    def changing(self, change: str) -> None:
        self.change, self.stamp = change, _stamp(self.current)

    def changed(self, done: bool = True) -> None:
        if done:
            (self.added if self.change == "graphs" else self.measured).append(str(self.current))
        self.change = None

    def end(self) -> None:
        self.current, self.change = None, None

    def converted(self) -> int:
        """Versions changed by this run, the one being changed not counted."""
        return len(set(self.added + self.measured) - {str(self.current)})

    def unwritable(self, root: Path, exc: OSError) -> str:
        """The message of an OSError while changing the current version: what could not be written where, and
        what is left (add_files and amend_manifest leave nothing of a change that failed)."""
        from aevae.repository import added_name

        where = f" ({added_name(Path(exc.filename).name)})" if exc.filename else ""
        what = "record the test figures of" if self.change == "figures" else "add the graphs to"
        left = ("its graphs are added, its test figures not" if str(self.current) in self.added
                else "it is left as it was")
        return (f"cannot {what} {self.current} in {root}: {exc.strerror or exc}{where}; {left} "
                f"({self.converted()} version(s) converted before it)")

    def summary(self, measuring: bool) -> str:
        line = f"added ONNX graphs to {len(self.added)} version(s)"
        return f"{line}; recorded test figures for {len(self.measured)}" if measuring else line

    def stopped(self) -> str:
        """One line: the versions finished (graphs added, figures recorded), the one in progress and what of
        it changed (nothing, unless its new manifest was in place when the stop came: then that change is
        done), and how many were not reached."""
        if self.change is not None and _stamp(self.current) != self.stamp:
            self.changed()  # the change's manifest was swapped in before the stop: it is done
        parts = []
        if self.added:
            parts.append(f"graphs added to {_names(self.added)}")
        if self.measured:
            parts.append(f"test figures recorded for {_names(self.measured)}")
        if not parts:
            parts.append("no version changed")
        if self.complete:
            parts.append(f"{len(self.complete)} version(s) already converted")
        current = str(self.current) if self.current is not None else None
        unfinished = False
        if current in self.added and current not in self.measured and self.change == "figures":
            parts.append(f"{current}'s test figures not recorded (its graphs are in place)")
            unfinished = True
        elif current is not None and current not in self.added + self.measured:
            parts.append(f"{current} left as it was (nothing of it changed)")
            unfinished = True
        left = self.total - self.reached
        if left:
            parts.append(f"{left} version(s) not reached")
        again = "; the same command again does the rest" if left or unfinished else ""
        return f"aevae export-onnx: stopped: {'; '.join(parts)}{again}"
