"""The ONNX graphs of a version: `encoder.onnx` and `decoder.onnx`, exported from the torch model and
checked against it with ONNX Runtime before they are written.

Serving runs them with ONNX Runtime, so an encoder or decoder process needs no torch. Export needs torch and
onnx (the `model` extra); the check needs onnxruntime.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ENCODER = "encoder.onnx"
DECODER = "decoder.onnx"
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
    import onnxruntime as ort
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


def bytes_writer(data: bytes) -> Any:
    def write(path: Path) -> None:
        path.write_bytes(data)
    return write


# -- `aevae export-onnx`: the graphs for versions written before the trainer wrote them ------------------
def register(sub: Any) -> None:
    import argparse

    p = sub.add_parser("export-onnx", help="add ONNX graphs to model versions that lack them (serving then "
                                           "needs no torch)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("models", nargs="*", metavar="NAME[/VERSION]", help="versions to convert (default: all)")
    p.add_argument("--models-dir", default=None, help="model repository (or AEVAE_MODELS_DIR; default ./models)")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    from aevae.errors import UserError
    from aevae.repository import ModelRepository

    try:
        import onnxruntime  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise UserError(f"export-onnx needs torch, onnx and onnxruntime ({exc.name} is missing): "
                        "pip install 'aevae[model]'") from None
    repository = ModelRepository(args.models_dir)
    wanted = [m.split("/", 1) for m in args.models]
    done = 0
    for name, versions in repository.versions().items():
        for version in versions:
            if wanted and not any(w[0] == name and (len(w) == 1 or w[1] == str(version.number)) for w in wanted):
                continue
            if ENCODER in version.manifest.files and DECODER in version.manifest.files:
                print(f"{version}: has its ONNX graphs")
                continue
            add_graphs(repository, version)
            done += 1
    print(f"added ONNX graphs to {done} version(s)")
    return 0


def add_graphs(repository: Any, version: Any) -> Any:
    """Exports and checks the graphs of one version and adds them to it (the weights stay as they are)."""
    from aevae.runtimes import TorchRuntime

    model = TorchRuntime.open(version).model
    graphs, entry = export(model)
    updated = repository.add_files(version, {name: bytes_writer(data) for name, data in graphs.items()},
                                   runtimes={"onnx": entry})
    print(f"{version}: wrote {ENCODER} and {DECODER} (largest difference to torch {entry['max_abs_diff']:.2g})")
    return updated
