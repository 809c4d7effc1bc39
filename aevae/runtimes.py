"""The model runtimes: ONNX Runtime over the version's graphs (`encoder.onnx`, `decoder.onnx`), or torch over
its weights (`weights.pt`, loaded with weights_only=True).

A runtime is chosen per version by `open_runtime`; each imports its framework only when it is opened, so a
serving process that runs ONNX graphs never loads torch. The decoding precision is chosen there too: "fp32",
"int8" (ONNX Runtime over `decoder.int8.onnx`) or "bf16" (torch under bfloat16 autocast); encoding is always
float32. See docs/measurements.md, Reduced precision.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from aevae import memory
from aevae.cpus import available_cpus
from aevae.repository import WEIGHTS, Version


RUNTIMES = ("auto", "onnx", "torch")
PRECISIONS = ("fp32", "bf16", "int8")  # of decoding
ENCODER, DECODER = "encoder.onnx", "decoder.onnx"  # as aevae.onnx_export writes them
DECODER_INT8 = "decoder.int8.onnx"
# The least a load takes, per byte of the files it reads: the bytes read and checked (Version.verified), and the
# runtime's own copy of the weights, twice for ONNX Runtime's two sessions per graph. Measured on 4096-wide
# layers: 3.6-3.7x the files' bytes at the peak, on either runtime (docs/measurements.md).
LOAD_BYTES_PER_FILE_BYTE = 3

log = logging.getLogger(__name__)


def require_memory(version: Version, files: list[str]) -> None:
    """MemoryError, before anything is read, when loading `files` of `version` could not fit in the memory
    left (`aevae.memory`): a decoder in a 2 GiB container loading a version of 8192-wide layers was killed by
    the kernel, every request in flight with it, rather than refusing that one version."""
    try:
        size = sum(version.file(name).stat().st_size for name in files)
    except OSError:
        return  # a missing file is said by the load itself
    problem = memory.shortfall(LOAD_BYTES_PER_FILE_BYTE * size)
    if problem:
        raise MemoryError(f"loading its {' and '.join(files)} ({size / memory.GIB:,.1f} GiB) needs at least {problem}")


def onnxruntime() -> Any:
    """The onnxruntime module, its telemetry off unless ORT_DISABLE_TELEMETRY says otherwise: ONNX Runtime
    (1.32 on Linux) records usage events under ~/.cache/Microsoft and sends them to
    mobile.events.data.microsoft.com (the services looked that name up from their containers), which a model
    server or a training job must not do unasked. Every import of it in aevae goes through here."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    return ort


def label(runtime: Any) -> str:
    """What ListModels reports: "onnx", "torch", or with a reduced decoding precision "onnx-int8",
    "torch-bf16"."""
    precision = getattr(runtime, "precision", "fp32")
    return runtime.name if precision == "fp32" else f"{runtime.name}-{precision}"


def precision_of(runtime_label: str) -> str:
    """The decoding precision a `label` names: "onnx-int8" -> "int8", "onnx" or "torch" -> "fp32"."""
    name, _, precision = runtime_label.partition("-")
    return precision or "fp32"


class OnnxRuntime:
    """Two sessions per graph: a single-threaded one for small batches (waking a thread pool costs more than
    the arithmetic of a few rows) and one with `threads` intra-op threads for the rest."""

    name = "onnx"
    SMALL = 64  # rows up to which the single-threaded session runs

    def __init__(self, version: Version, threads: int | None = None, precision: str = "fp32"):
        def sessions(graph: str) -> tuple[Any, Any]:
            # From the bytes checked against the manifest, read once: a session opened by the file's path read
            # whatever the file held by then (see Version.verified).
            model = version.verified(graph)
            return session(model, 1), session(model, threads)

        def session(model: bytes, intra: int | None) -> Any:
            options = ort.SessionOptions()
            options.inter_op_num_threads = 1
            if intra:
                options.intra_op_num_threads = intra
            # Idle pool threads sleep instead of spinning: the gRPC threads share these cores.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

        ort = onnxruntime()
        decoder = DECODER_INT8 if precision == "int8" else DECODER
        require_memory(version, [ENCODER, decoder])

        self.encoders = sessions(ENCODER)
        self.precision = precision
        self.rows_alone = precision != "int8"  # int8: activations quantized per batch (onnx_export.quantize_decoder)
        self.decoders = sessions(decoder)
        self._variational = len(self.encoders[0].get_outputs()) == 2
        manifest = version.manifest
        _check_signature(ENCODER, self.encoders[0].get_inputs()[0].shape, manifest.image_shape, "images")
        _check_signature(decoder, self.decoders[0].get_inputs()[0].shape, (manifest.latent_dim,), "latents")
        _check_signature(decoder, self.decoders[0].get_outputs()[0].shape, manifest.image_shape, "images")
        _check_encoder_outputs(self.encoders[0], manifest.kind, manifest.latent_dim, manifest.image_shape)
        _check_decoder_output(decoder, self.decoders[0], manifest.latent_dim, manifest.image_shape)

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.encoders[len(images) > self.SMALL].run(None, {"images": images})
        return outputs[0], outputs[1] if self._variational else None

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.decoders[len(latents) > self.SMALL].run(None, {"latents": latents})[0]


def _check_signature(graph: str, shape: list[Any], expected: tuple[int, ...], name: str) -> None:
    """A graph whose tensor `name` is not N x `expected` cannot serve what the manifest describes: the version
    is broken (ValueError), rather than every request failing inside ONNX Runtime."""
    if list(shape[1:]) != list(expected):
        dims = " x ".join(str(d) for d in shape[1:])
        raise ValueError(f"{graph} takes or gives {name} of N x {dims}, but the manifest says N x "
                         f"{' x '.join(map(str, expected))}")


def _check_encoder_outputs(session: Any, kind: str, latent_dim: int, image_shape: tuple[int, int]) -> None:
    """An encoder graph gives the mean, and for a VAE the log-variance, each N x latent_dim. One giving fewer
    than the manifest's kind needs left the log-variance unwritten (each Encode answered uninitialized
    memory), one of another width failed every request inside the model: the version is broken (ValueError).
    The widths are seen by encoding one blank image (a graph's output shapes may be symbolic)."""
    count, expected = len(session.get_outputs()), 2 if kind == "vae" else 1
    if count != expected:
        gives = {1: " (the mean)", 2: " (the mean and the log-variance)"}.get(count, "")
        raise ValueError(f"{ENCODER} gives {count} output{'' if count == 1 else 's'}{gives}, but the manifest "
                         f"says {kind}: {expected}")
    try:
        outputs = session.run(None, {"images": np.zeros((1, *image_shape), np.float32)})
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors: the graph cannot serve Encode
        raise ValueError(f"{ENCODER} cannot encode an image: {_first_line(exc)}") from None
    for output, name in zip(outputs, ("mean", "log-variance")):
        _check_signature(ENCODER, list(output.shape), (latent_dim,), name)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().strip('"').strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_decoder_output(graph: str, session: Any, latent_dim: int, image_shape: tuple[int, int]) -> None:
    """A decoder graph takes `latents` alone and gives N x H x W float32. Its declared shapes were checked, but
    not its input's name nor its output's type: a graph whose input had another name (or that wanted a
    second input) loaded, was listed as serving, and failed every Decode as an internal error; one giving
    float64 answered images of another type than the API's. Seen by decoding one zero latent (ValueError)."""
    try:
        (images, *_) = session.run(None, {"latents": np.zeros((1, latent_dim), np.float32)})
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors: the graph cannot serve Decode
        raise ValueError(f"{graph} cannot decode a latent: {_first_line(exc)}") from None
    if images.dtype != np.float32 or images.shape != (1, *image_shape):
        raise ValueError(f"{graph} gives {images.dtype} images of {' x '.join(map(str, images.shape))} for one "
                         f"latent, but the manifest says float32 of 1 x {' x '.join(map(str, image_shape))}")


class TorchRuntime:
    name = "torch"
    # A row's image depends on the rows beside it only in float32's last bits (oneDNN's kernels sum in an order
    # that depends on the batch's size: up to about 1e-6, and a uint8 pixel at a rounding edge by 1 level).
    rows_alone = True
    # torch's intra-op threads are per process: `threads` is applied when the runtime is opened.

    def __init__(self, model: Any, precision: str = "fp32"):
        """`model`: an aevae.models.Autoencoder in eval mode; `precision` of decoding, "fp32" or "bf16"
        (bfloat16 autocast: the linear layers in bfloat16, measured faster here than a bfloat16 copy of the
        weights, whose LayerNorms are slow)."""
        import torch

        self._torch = torch
        self.model = model
        self.precision = precision

    @classmethod
    def open(cls, version: Version, threads: int | None = None, precision: str = "fp32") -> "TorchRuntime":
        import torch

        if threads:
            torch.set_num_threads(threads)

        import io

        from aevae.models import Architecture, build

        require_memory(version, [WEIGHTS])
        # weights_only=True: a file carrying a pickle payload raises instead of running code. From the bytes
        # checked against the manifest (see Version.verified).
        state = torch.load(io.BytesIO(version.verified(WEIGHTS)), map_location="cpu", weights_only=True)
        architecture = Architecture.from_json(version.manifest.architecture)
        # Counted before the model is built: an architecture edited to other widths built a model of its size
        # first (hidden [8000, 8000]: 0.5 GiB and 0.7 s; more, an out-of-memory kill) only to fail to load.
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ValueError(f"{WEIGHTS} is not a plain state_dict of tensors")
        held, expected = sum(t.numel() for t in state.values()), sum(architecture.parameters())
        if held != expected:
            raise ValueError(f"{WEIGHTS} holds {held:,} parameters, but the manifest's architecture has "
                             f"{expected:,}: they describe different models")
        model = build(architecture)
        model.load_state_dict(state)
        return cls(model.eval(), precision)

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with self._torch.inference_mode():
            mu, logvar = self.model.encode(self._torch.from_numpy(images))
        return mu.numpy(), None if logvar is None else logvar.numpy()

    def decode(self, latents: np.ndarray) -> np.ndarray:
        bf16 = self.precision == "bf16"
        with self._torch.inference_mode(), self._torch.autocast("cpu", dtype=self._torch.bfloat16, enabled=bf16):
            return self.model.decode(self._torch.from_numpy(latents)).float().numpy()


class RuntimeUnavailable(Exception):
    """A runtime that is installed but cannot be imported in this process: its libraries could not be mapped
    (a low `ulimit -v`, memory), or the installation is broken. Not the version's fault, so the store does not
    mark it broken: it said "torch is not installed" of an installed torch, and a model that was fine stayed
    unusable after the limit was lifted."""


def unloadable(exc: ImportError, module: str, install: str) -> Exception:
    """What `open_runtime` raises for `module` failing to import with `exc`: not installed (ValueError: the
    version cannot load here, with how to install it), or installed but not loadable (RuntimeUnavailable)."""
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == module:
        return ValueError(f"{module} is not installed: {install}")
    import resource

    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    hint = "" if limit == resource.RLIM_INFINITY else f" (this process's address space is limited: ulimit -v " \
                                                         f"{limit // 1024})"
    return RuntimeUnavailable(f"{module} is installed but cannot be loaded in this process: {_first_line(exc)}"
                              f"{hint}")


def open_runtime(version: Version, prefer: str = "auto", threads: int | None = None,
                 precision: str = "fp32") -> OnnxRuntime | TorchRuntime:
    """"auto": ONNX Runtime when the version has its graphs and onnxruntime is installed, else torch.
    `threads`: the intra-op pool's width (default: the CPUs this process may use, `aevae.cpus`).
    `precision` of decoding: "int8" needs ONNX Runtime and the version's `decoder.int8.onnx` (a version
    without it decodes in fp32, with a warning: `aevae export-onnx` adds it); "bf16" runs on torch."""
    if prefer not in RUNTIMES:
        raise ValueError(f"runtime must be one of {list(RUNTIMES)}, got {prefer!r}")
    threads = threads or available_cpus()  # not the runtimes' own default, the machine's cores (aevae.cpus)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "bf16":
        if prefer == "onnx":
            raise ValueError("bf16 decoding runs on torch, not ONNX Runtime: use runtime torch or auto")
        try:
            return TorchRuntime.open(version, threads, precision)
        except ImportError as exc:
            failure = unloadable(exc, "torch", "pip install 'aevae[model]'")
            if isinstance(failure, RuntimeUnavailable):
                raise failure from None
            raise ValueError("bf16 decoding needs torch (pip install 'aevae[model]'); or use precision int8 "
                             "or fp32") from None
    if precision == "int8":
        if prefer == "torch":
            raise ValueError("int8 decoding runs on ONNX Runtime, not torch: use runtime onnx or auto")
        if DECODER_INT8 not in version.manifest.files:
            log.warning("%s has no %s: decoding in fp32 (add it with `aevae export-onnx`)", version, DECODER_INT8)
            precision = "fp32"
        else:
            prefer = "onnx"
    has_graphs = ENCODER in version.manifest.files and DECODER in version.manifest.files
    if prefer == "onnx" and not has_graphs:
        raise ValueError("it has no ONNX graphs (add them with `aevae export-onnx`)")
    failures = []  # why each runtime tried could not be imported, in order
    if prefer in ("auto", "onnx") and has_graphs:
        try:
            return OnnxRuntime(version, threads, precision)
        except ImportError as exc:
            failures.append(unloadable(exc, "onnxruntime", "pip install 'aevae[serve]'"))
            if prefer == "onnx":
                raise failures[0] from None
    try:
        return TorchRuntime.open(version, threads)
    except ImportError as exc:
        failures.append(unloadable(exc, "torch", "pip install 'aevae[model]'"))
    # A runtime installed but not loadable here is the problem to report, not the version's own.
    unavailable = [failure for failure in failures if isinstance(failure, RuntimeUnavailable)]
    if unavailable:
        raise unavailable[0]
    if not has_graphs:
        raise ValueError("it has no ONNX graphs and torch is not installed: add the graphs with `aevae "
                         "export-onnx` or install torch (pip install 'aevae[model]')")
    raise ValueError("; ".join(map(str, failures)))


def torch_module(model: Any) -> Any:
    """The torch Autoencoder behind a LoadedModel on the torch runtime (for code that needs logits)."""
    runtime = model.runtime
    if not isinstance(runtime, TorchRuntime):
        raise TypeError(f"{model.name}/{model.number} runs on {runtime.name}; open its store with runtime='torch'")
    return runtime.model
