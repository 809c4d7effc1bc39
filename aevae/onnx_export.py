"""The ONNX graphs of a version: `encoder.onnx` and `decoder.onnx`, exported from the torch model and
checked against it with ONNX Runtime before they are written; and `decoder.int8.onnx`, the decoder with its
weights quantized to int8 (ONNX Runtime dynamic quantization), with its measured test-set quality beside
fp32's (and torch bf16's, when torch is at hand) in the manifest's `runtimes["int8"]` / `runtimes["bf16"]`.

Serving runs them with ONNX Runtime, so an encoder or decoder process needs no torch. Export needs torch and
onnx (the `model` extra); the check needs onnxruntime.
"""

from __future__ import annotations

import io
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ENCODER = "encoder.onnx"
DECODER = "decoder.onnx"
DECODER_INT8 = "decoder.int8.onnx"
OPSET = 17
TOLERANCE = 1e-4  # the largest difference to torch's outputs a graph may have


class OnnxExportError(ValueError):
    """The graphs could not be exported or do not compute what the torch model computes."""


def _graphs(model: Any) -> dict[str, bytes]:
    import torch

    class Encode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> Any:
            mean, logvar = self.model.encode(images)
            return (mean, logvar) if logvar is not None else mean

    class Decode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, latents: torch.Tensor) -> torch.Tensor:
            return self.model.decode(latents)

    outputs = ["mean", "logvar"] if model.variational else ["mean"]
    h, w = model.arch.image_shape
    graphs = {}
    for name, module, example, inputs, names in (
        (ENCODER, Encode(), torch.zeros(2, h, w), "images", outputs),
        (DECODER, Decode(), torch.zeros(2, model.arch.latent_dim), "latents", ["images"]),
    ):
        buffer = io.BytesIO()
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), (example,), buffer,  # type: ignore[arg-type]  # a file object works
                              input_names=[inputs], output_names=names,
                              dynamic_axes={n: {0: "n"} for n in (inputs, *names)}, opset_version=OPSET,
                              dynamo=False)
        graphs[name] = buffer.getvalue()
    return graphs


def export(model: Any, check_batch: np.ndarray | None = None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The two graphs of a torch Autoencoder (in eval mode), and the manifest's `runtimes["onnx"]` entry with
    the largest difference to torch's outputs on `check_batch` (latent-space samples derived from it).
    OnnxExportError when a difference exceeds TOLERANCE."""
    from aevae.runtimes import onnxruntime

    ort = onnxruntime()
    import torch

    graphs = _graphs(model)
    h, w = model.arch.image_shape
    rng = np.random.default_rng(0)
    images = check_batch if check_batch is not None else rng.random((256, h, w), dtype=np.float32)
    with torch.inference_mode():
        mean, logvar = model.encode(torch.from_numpy(images))
        latents = torch.cat([mean, torch.from_numpy(rng.normal(size=(256, model.arch.latent_dim)).astype(np.float32))])
        expected = {"mean": mean.numpy(), "images": model.decode(latents).numpy()}
        if logvar is not None:
            expected["logvar"] = logvar.numpy()
    encoder = ort.InferenceSession(graphs[ENCODER], providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(graphs[DECODER], providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in encoder.get_outputs()], encoder.run(None, {"images": images})))
    got["images"] = decoder.run(None, {"latents": latents.numpy()})[0]
    diffs = {k: float(np.abs(got[k] - v).max()) for k, v in expected.items()}
    worst = max(diffs.values())
    if not worst <= TOLERANCE:
        raise OnnxExportError(f"the ONNX graphs differ from the torch model by up to {worst:g} (> {TOLERANCE:g}): "
                              f"{diffs}")
    return graphs, {"files": [ENCODER, DECODER], "opset": OPSET, "max_abs_diff": worst,
                    "max_abs_diff_by_output": diffs, "onnxruntime": ort.__version__, "torch": torch.__version__}


# -- reduced precision: the int8 decoder and the quality cost of each decoding precision ----------------
EVAL_SEED = 1234  # the posterior sample of the VAE's figures, as in training's evaluation
# The largest pixel difference (of 1.0) to fp32 an int8 graph may have on N(0, I) latents before it is called
# broken: a sanity bound only (the default-trained models measure 0.09-0.10 at a test BCE cost under 0.25
# nats); the quality cost itself is the measured `bce_cost`.
INT8_TOLERANCE = 0.5


def quantize_decoder(decoder: bytes) -> bytes:
    """The decoder graph with int8 weights (per output channel, symmetric) and activations quantized on the fly
    per batch (ONNX Runtime `quantize_dynamic`): the matrix products run on the processor's int8 dot-product
    instructions (VNNI here)."""
    from aevae.runtimes import onnxruntime

    onnxruntime()  # its telemetry off before its quantization tools import it
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process: a no-op for an MLP
    try:
        with tempfile.TemporaryDirectory() as folder:
            source, target = Path(folder, DECODER), Path(folder, DECODER_INT8)
            source.write_bytes(decoder)
            quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)
            return target.read_bytes()
    finally:
        logging.getLogger().setLevel(quiet)


def decode_quality(images: np.ndarray, encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]],
                   decoders: dict[str, Callable[[np.ndarray], np.ndarray]], chunk: int = 4096) -> dict[str, Any]:
    """Test-set quality of each decoder on the same latents, in nats per image: `bce` of the images decoded
    from the VAE's posterior sample (seed EVAL_SEED; the AE's code), and `loss` = bce + KL (the negative ELBO
    for the VAE; the encoder, and so the KL, is float32 in every precision). `images`: N x H x W float32 in
    [0, 1]. The BCE is computed from the decoded probabilities (clipped to [1e-7, 1 - 1e-7]), the same way
    for every decoder, so differences between them are like for like."""
    rng = np.random.default_rng(EVAL_SEED)
    bce = {name: 0.0 for name in decoders}
    kl = 0.0
    eps = np.float32(1e-7)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].reshape(-1, images.shape[1] * images.shape[2])
        mean, logvar = encode(images[start:start + chunk])
        z = mean
        if logvar is not None:
            z = (mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape, dtype=np.float32)).astype(np.float32)
            kl += float(-0.5 * np.sum(1.0 + logvar - mean.astype(np.float64) ** 2 - np.exp(logvar.astype(np.float64))))
        for name, decode in decoders.items():
            p = np.clip(decode(z).reshape(len(x), -1), eps, 1 - eps)
            bce[name] += float(-np.sum(x * np.log(p) + (1 - x) * np.log1p(-p), dtype=np.float64))
    n = len(images)
    return {name: {"bce": round(total / n, 4), "loss": round((total + kl) / n, 4)} for name, total in bce.items()}


def reduced_precision(graphs: dict[str, bytes], model: Any = None, test_images: np.ndarray | None = None,
                      check_latents: np.ndarray | None = None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """`decoder.int8.onnx` from the fp32 graphs, and the manifest's runtimes entries for it and bf16 (see
    `precision_entries`). OnnxExportError when the int8 graph is broken (a difference over INT8_TOLERANCE)."""
    int8 = quantize_decoder(graphs[DECODER])
    return {DECODER_INT8: int8}, precision_entries({**graphs, DECODER_INT8: int8}, model, test_images, check_latents)


def precision_entries(graphs: dict[str, bytes], model: Any = None, test_images: np.ndarray | None = None,
                      check_latents: np.ndarray | None = None) -> dict[str, Any]:
    """The manifest's runtimes entries of the reduced precisions, measured on the graphs given (the fp32 ones
    and `decoder.int8.onnx`: a version's own int8 graph is measured as it is, never quantized anew): "int8"
    (its file, the largest pixel difference to the fp32 graph on `check_latents`, and with `test_images` its
    test-set quality beside fp32's) and, given the torch `model`, "bf16" (torch autocast decoding, measured
    the same way). OnnxExportError when the int8 graph is broken (a difference over INT8_TOLERANCE)."""
    from aevae.runtimes import onnxruntime

    ort = onnxruntime()
    sessions = {name: ort.InferenceSession(graphs[name], providers=["CPUExecutionProvider"])
                for name in (ENCODER, DECODER, DECODER_INT8)}
    variational = len(sessions[ENCODER].get_outputs()) == 2
    latent_dim = sessions[DECODER].get_inputs()[0].shape[1]
    if check_latents is None:
        check_latents = np.random.default_rng(0).normal(size=(512, latent_dim)).astype(np.float32)

    def onnx_decoder(graph: str) -> Callable[[np.ndarray], np.ndarray]:
        return lambda z: sessions[graph].run(None, {"latents": z})[0]

    def encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = sessions[ENCODER].run(None, {"images": np.ascontiguousarray(x, dtype=np.float32)})
        return out[0], out[1] if variational else None

    diff = float(np.abs(onnx_decoder(DECODER_INT8)(check_latents) - onnx_decoder(DECODER)(check_latents)).max())
    if not diff <= INT8_TOLERANCE:
        raise OnnxExportError(f"the int8 decoder differs from the fp32 one by up to {diff:g} (> {INT8_TOLERANCE:g})")
    entries: dict[str, Any] = {"int8": {
        "files": [DECODER_INT8], "decoder": DECODER_INT8, "runtime": "onnx",
        "quantization": "onnxruntime quantize_dynamic: int8 weights per output channel, activations per batch",
        "max_abs_diff": diff, "onnxruntime": ort.__version__}}
    decoders = {"fp32": onnx_decoder(DECODER), "int8": onnx_decoder(DECODER_INT8)}
    if model is not None:
        from aevae.runtimes import TorchRuntime

        bf16 = TorchRuntime(model, precision="bf16")
        diff = float(np.abs(bf16.decode(check_latents) - decoders["fp32"](check_latents)).max())
        entries["bf16"] = {"runtime": "torch", "autocast": "bfloat16 (the decoder; the encoder stays float32)",
                           "max_abs_diff": diff}
        decoders["bf16"] = bf16.decode
    if test_images is not None:
        for name, figures in figures_vs_fp32(test_images, encode, decoders).items():
            entries[name]["test"] = figures
    return entries


def figures_vs_fp32(images: np.ndarray, encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]],
                 decoders: dict[str, Callable[[np.ndarray], np.ndarray]]) -> dict[str, dict[str, Any]]:
    """The `test` figures of each decoder but "fp32" (the reference every other is measured against, which
    `decoders` must hold): its quality (decode_quality), fp32's beside it, and the cost in BCE."""
    quality = decode_quality(images, encode, decoders)
    fp32 = quality["fp32"]
    return {name: {**quality[name], "fp32_bce": fp32["bce"], "fp32_loss": fp32["loss"],
                   "bce_cost": round(quality[name]["bce"] - fp32["bce"], 4), "images": len(images),
                   "units": "nats per image; loss is bce + KL, the negative ELBO for the VAE"}
            for name in decoders if name != "fp32"}


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


def bytes_writer(data: bytes) -> Any:
    def write(path: Path) -> None:
        path.write_bytes(data)
    return write


# -- `aevae export-onnx`: the graphs for versions written before the trainer wrote them ------------------
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
    broken = []
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
        except OSError as exc:  # a read-only or full repository: the version stays as it was
            raise UserError(progress.unwritable(repository.root, exc)) from None
        progress.end()
    print(progress.summary(test_images is not None))
    if broken:
        raise UserError(f"{len(broken)} version(s) broken, left as they are: {', '.join(broken)}")
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
            exported, runtimes["onnx"] = export(model)
            new = {name: data for name, data in exported.items() if name not in graphs}
            graphs = {**exported, **graphs}
        if DECODER_INT8 not in files:
            int8, entries = reduced_precision(graphs, model, test_images)
            new.update(int8)
            runtimes.update(entries)
    except Exception as exc:  # noqa: BLE001 - a graph it holds that ONNX cannot read, or no export within tolerance
        raise BrokenVersionError(f"broken: cannot make its graphs ({_first_line(exc)})") from None
    updated = repository.add_files(version, {name: bytes_writer(data) for name, data in new.items()},
                                   runtimes=runtimes)
    import hashlib

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
        entries = precision_entries(graphs, model, test_images)
    except Exception as exc:  # noqa: BLE001 - a graph ONNX Runtime cannot run, an int8 graph far off fp32
        raise BrokenVersionError(f"broken: cannot measure its decoders ({_first_line(exc)})") from None
    measured = dict(version.manifest.files)
    recorded: list[str] = []

    def amend(current: Any) -> Any:
        if any(current.files.get(name) != digest for name, digest in measured.items()):
            raise BrokenVersionError("not measured: its files changed while they were measured (another writer); "
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
