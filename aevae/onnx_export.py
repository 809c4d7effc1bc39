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


def bytes_writer(data: bytes) -> Any:
    def write(path: Path) -> None:
        path.write_bytes(data)
    return write
