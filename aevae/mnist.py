"""MNIST from its four original IDX files, padded to 32x32 and held in memory.

Training reads whole tensors, never per-sample Python transforms: at this model size the input pipeline,
not the network, is what a per-sample loader spends its time on.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_ROOT_ENV = "AEVAE_DATA_ROOT"
IMAGE_SIZE = 32
RAW_SIZE = 28
PAD = (IMAGE_SIZE - RAW_SIZE) // 2

# name -> (byte size, sha256 of the uncompressed file, IDX magic, item count)
FILES: dict[str, tuple[int, str, int, int]] = {
    "train-images-idx3-ubyte": (
        47040016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 2051, 60000),
    "train-labels-idx1-ubyte": (
        60008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 2049, 60000),
    "t10k-images-idx3-ubyte": (
        7840016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 2051, 10000),
    "t10k-labels-idx1-ubyte": (
        10008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 2049, 10000),
}


class MnistError(RuntimeError):
    """MNIST could not be found or one of its files is damaged; the message says which and how to fix it."""


@dataclass(frozen=True)
class Split:
    """One split as uint8 arrays: images N x 32 x 32 (0..255, zero padded), labels N."""

    images: np.ndarray
    labels: np.ndarray

    def floats(self) -> np.ndarray:
        """Images as float32 in [0, 1], the models' input."""
        return self.images.astype(np.float32) / 255.0


@dataclass(frozen=True)
class Mnist:
    train: Split
    test: Split
    source: str
    sha256: dict[str, str]


def _how_to_fix(raw: Path | None) -> str:
    files = ", ".join(FILES)
    where = f" (looked in {raw})" if raw else ""
    return (
        f"MNIST not available{where}. Pass --data-root DIR or set {DATA_ROOT_ENV}=DIR, where DIR holds "
        f"MNIST/raw/ with the four uncompressed IDX files: {files}."
    )


def verify(raw: Path) -> dict[str, str]:
    """Checks each file's size and SHA-256; names the first file that is missing, truncated or corrupt."""
    digests = {}
    for name, (size, sha, _, _) in FILES.items():
        path = raw / name
        if not path.is_file():
            raise MnistError(f"missing file {path}. " + _how_to_fix(raw))
        actual = path.stat().st_size
        if actual != size:
            raise MnistError(
                f"{path} is truncated or wrong: {actual} bytes, expected {size}. Replace it with the "
                f"original uncompressed file."
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha:
            raise MnistError(f"{path} is corrupt: sha256 {digest}, expected {sha}. Replace it with the original.")
        digests[name] = digest
    return digests


def _read_idx(path: Path) -> np.ndarray:
    _, _, magic, count = FILES[path.name]
    data = np.fromfile(path, dtype=np.uint8)
    header = 16 if magic == 2051 else 8
    if int.from_bytes(data[:4].tobytes(), "big") != magic:
        raise MnistError(f"{path} is not an IDX file with magic {magic}")
    body = data[header:]
    return body.reshape(count, RAW_SIZE, RAW_SIZE) if magic == 2051 else body.copy()


def pad(images: np.ndarray) -> np.ndarray:
    """28x28 -> 32x32 with a 2-pixel zero border, as the seed trains on."""
    return np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))


def _download(cache: Path) -> Path:
    """torchvision's download, the fallback when no data root is given; returns the raw folder."""
    try:
        from torchvision.datasets import MNIST
    except ImportError as exc:  # the client-only install has no torchvision
        raise MnistError(_how_to_fix(None) + " (torchvision, needed to download, is not installed)") from exc
    try:
        MNIST(str(cache), train=True, download=True)
        MNIST(str(cache), train=False, download=True)
    except Exception as exc:  # noqa: BLE001 - any network or disk failure means the same to the user
        # one line: torchvision's message lists every mirror it tried, a line each
        raise MnistError(_how_to_fix(None) + f" The download into {cache} failed too: {' '.join(str(exc).split())}"
                         ) from exc
    return cache / "MNIST" / "raw"


def resolve_root(data_root: str | os.PathLike[str] | None) -> Path | None:
    """--data-root wins over the environment variable; None means neither was given."""
    value = data_root or os.environ.get(DATA_ROOT_ENV)
    return Path(value).expanduser() if value else None


def load(data_root: str | os.PathLike[str] | None = None, cache: Path | None = None) -> Mnist:
    """Loads and verifies MNIST from the data root, else downloads it into `cache`."""
    root = resolve_root(data_root)
    if root is not None:
        raw = root / "MNIST" / "raw"
        if not raw.is_dir():
            raise MnistError(_how_to_fix(raw))
    else:
        raw = _download(cache or Path.home() / ".cache" / "aevae")
    digests = verify(raw)
    train = Split(pad(_read_idx(raw / "train-images-idx3-ubyte")), _read_idx(raw / "train-labels-idx1-ubyte"))
    test = Split(pad(_read_idx(raw / "t10k-images-idx3-ubyte")), _read_idx(raw / "t10k-labels-idx1-ubyte"))
    return Mnist(train=train, test=test, source=str(raw.resolve()), sha256=digests)
