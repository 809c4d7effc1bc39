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
    """`decoder.int8.onnx` from the fp32 graphs, and the manifest's runtimes entries: "int8" (its file, the
    largest pixel difference to the fp32 graph on `check_latents`, and with `test_images` its test-set
    quality beside fp32's) and, given the torch `model`, "bf16" (torch autocast decoding, measured the same
    way). OnnxExportError when the int8 graph is broken (a difference over INT8_TOLERANCE)."""
    from aevae.runtimes import onnxruntime

    ort = onnxruntime()

    int8 = quantize_decoder(graphs[DECODER])
    sessions = {name: ort.InferenceSession(data, providers=["CPUExecutionProvider"])
                for name, data in ((ENCODER, graphs[ENCODER]), (DECODER, graphs[DECODER]), (DECODER_INT8, int8))}
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
        quality = decode_quality(test_images, encode, decoders)
        for name, entry in entries.items():
            entry["test"] = {**quality[name], "fp32_bce": quality["fp32"]["bce"], "fp32_loss": quality["fp32"]["loss"],
                             "bce_cost": round(quality[name]["bce"] - quality["fp32"]["bce"], 4),
                             "images": len(test_images),
                             "units": "nats per image; loss is bce + KL, the negative ELBO for the VAE"}
    return {DECODER_INT8: int8}, entries


def bytes_writer(data: bytes) -> Any:
    def write(path: Path) -> None:
        path.write_bytes(data)
    return write


# -- `aevae export-onnx`: the graphs for versions written before the trainer wrote them ------------------
def register(sub: Any) -> None:
    from aevae.help_format import DefaultsFormatter

    p = sub.add_parser("export-onnx", help="add ONNX graphs (and the int8 decoder) to model versions that lack "
                                           "them (serving then needs no torch)",
                       formatter_class=DefaultsFormatter)
    p.add_argument("models", nargs="*", metavar="NAME[/VERSION]", help="versions to convert (default: all)")
    p.add_argument("--models-dir", default=None, help="model repository (or AEVAE_MODELS_DIR; default ./models)")
    p.add_argument("--data-root", default=None, help="folder holding MNIST/raw/ (or AEVAE_DATA_ROOT): measure the "
                                                     "reduced-precision decoders' test-set quality (else skipped)")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    import os
    import sys

    from aevae.errors import UserError
    from aevae.repository import ModelRepository, added_name
    from aevae.store import broken_reason

    try:
        from aevae.runtimes import onnxruntime

        onnxruntime()
        import torch  # noqa: F401
    except ImportError as exc:
        raise UserError(f"export-onnx needs torch, onnx and onnxruntime ({exc.name} is missing): "
                        "pip install 'aevae[model]'") from None
    test_images = None
    if getattr(args, "data_root", None) or os.environ.get("AEVAE_DATA_ROOT"):
        from aevae import mnist

        try:
            test_images = mnist.load(getattr(args, "data_root", None)).test.floats()
        except mnist.MnistError as exc:
            raise UserError(str(exc)) from None
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

    unknown = [m for m, w in zip(args.models, wanted)
               if not any(chosen(w, v) for v in [*scan.broken, *(v for vs in available.values() for v in vs)])]
    if unknown:
        raise UserError(f"no such model or version: {', '.join(unknown)}; available: {scan.describe(repository.root)}")
    done, broken = 0, []
    # A version the scan already found broken (a file missing, a bad manifest) is named with its reason, as one
    # that fails to load below: left out silently, or called "no such version", it looked converted or absent.
    for gone in scan.broken:
        if not wanted or any(chosen(w, gone) for w in wanted):
            print(f"{gone.name}/{gone.number}: broken: {gone.reason}", file=sys.stderr)
            broken.append(f"{gone.name}/{gone.number}")
    for name, versions in available.items():
        for version in versions:
            if wanted and not any(chosen(w, version) for w in wanted):
                continue
            if {ENCODER, DECODER, DECODER_INT8} <= set(version.manifest.files):
                try:  # "has its graphs" of a truncated version read as all is well
                    version.check_files()
                except (OSError, ValueError) as exc:
                    print(f"{version}: broken: {broken_reason(exc)}", file=sys.stderr)
                    broken.append(str(version))
                    continue
                print(f"{version}: has its ONNX graphs")
                continue
            try:
                add_graphs(repository, version, test_images)
            except BrokenVersionError as exc:  # the others are still converted; the exit status says it
                print(f"{version}: {exc}", file=sys.stderr)
                broken.append(str(version))
                continue
            except OSError as exc:  # a read-only or full repository: the version stays as it was
                where = f" ({added_name(Path(exc.filename).name)})" if exc.filename else ""
                raise UserError(f"cannot add the graphs to {version} in {repository.root}: {exc.strerror or exc}"
                                f"{where}; it is left as it was ({done} version(s) converted before it)") from None
            done += 1
    print(f"added ONNX graphs to {done} version(s)")
    if broken:
        raise UserError(f"{len(broken)} version(s) broken, left as they are: {', '.join(broken)}")
    return 0


class BrokenVersionError(ValueError):
    """The version's files fail their checksums or its weights do not load: it gets no graphs."""


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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BrokenVersionError(f"broken: cannot make its graphs ({first[:300]})") from None
    updated = repository.add_files(version, {name: bytes_writer(data) for name, data in new.items()},
                                   runtimes=runtimes)
    detail = f" (largest difference to torch {runtimes['onnx']['max_abs_diff']:.2g})" if "onnx" in runtimes else ""
    cost = runtimes.get("int8", {}).get("test", {}).get("bce_cost")
    detail += f", int8 decoder test BCE {cost:+.2f} nats vs fp32" if cost is not None else ""
    print(f"{version}: wrote {' and '.join(sorted(new))}{detail}")
    return updated
