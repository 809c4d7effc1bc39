"""MNIST from its four original IDX files, padded to 32x32 and held in memory.

Training reads whole tensors, never per-sample Python transforms: at this model size the input pipeline,
not the network, is what a per-sample loader spends its time on.
"""

from __future__ import annotations

import hashlib
import os
import stat
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


def _missing(path: Path, raw: Path) -> str:
    """Why `path` is not there, and the fix. The gzip archives are what the MNIST site serves and what
    torchvision downloads: with only `<name>.gz` in the folder, "missing file" alone sent a user looking for a
    file that was right there, compressed."""
    if path.is_symlink():
        return f"{path} is a symlink to {os.readlink(path)}, which does not exist."
    packed = path.with_name(path.name + ".gz")
    if packed.is_file():
        return (f"missing file {path}: found {packed.name}, which aevae does not read compressed; decompress it "
                f"(gunzip -k {packed}).")
    return f"missing file {path}. " + _how_to_fix(raw)


def _read_file(path: Path, raw: Path, size: int) -> bytes:
    """The bytes of one MNIST file; MnistError naming the file and what is wrong with it. A file that cannot
    be read (its permissions, an I/O error) was an OSError traceback, and a folder or a FIFO in its place was
    reported as missing."""
    try:
        st = path.stat()
    except FileNotFoundError:  # also a symlink to nothing
        raise MnistError(_missing(path, raw)) from None
    except OSError as exc:
        raise MnistError(f"{path} cannot be read: {exc.strerror or exc}.") from None
    if stat.S_ISDIR(st.st_mode):
        raise MnistError(f"{path} is a folder; it should be the uncompressed IDX file of that name.")
    if not stat.S_ISREG(st.st_mode):
        raise MnistError(f"{path} is not a regular file (a FIFO, socket or device); it should be the "
                         f"uncompressed IDX file of that name.")
    if st.st_size != size:
        raise MnistError(
            f"{path} is truncated or wrong: {st.st_size} bytes, expected {size}. Replace it with the "
            f"original uncompressed file."
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MnistError(f"{path} cannot be read: {exc.strerror or exc}.") from None


def read_verified(raw: Path) -> dict[str, bytes]:
    """Each file's bytes, its size and SHA-256 checked; names the first file that is missing, unreadable,
    truncated or corrupt. Parsed from these same bytes (`_parse_idx`): what was checked is what is trained on."""
    contents = {}
    for name, (size, sha, _, _) in FILES.items():
        path = raw / name
        data = _read_file(path, raw, size)
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha:
            raise MnistError(f"{path} is corrupt: sha256 {digest}, expected {sha}. Replace it with the original.")
        contents[name] = data
    return contents


def _parse_idx(name: str, data: bytes) -> np.ndarray:
    """An IDX file's items from its verified bytes: images N x 28 x 28 or labels N, uint8."""
    _, _, magic, count = FILES[name]
    header = 16 if magic == 2051 else 8
    if int.from_bytes(data[:4], "big") != magic:
        raise MnistError(f"{name} is not an IDX file with magic {magic}")
    body = np.frombuffer(data, dtype=np.uint8, offset=header)
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


def _one_level_off(root: Path) -> str:
    """A hint when --data-root names the folder holding the files (or MNIST/) rather than the one holding
    MNIST/raw/: the usual slip, which the error alone ("looked in .../MNIST/raw/MNIST/raw") left to be spotted."""
    first = next(iter(FILES))
    for files in (root, root / "raw"):
        if (files / first).exists() or (files / f"{first}.gz").exists():
            fix = (f"pass --data-root {files.parent.parent}" if (files.parent.name, files.name) == ("MNIST", "raw")
                   else "move them into DIR/MNIST/raw/ and pass --data-root DIR")
            return f" The files are in {files}: {fix}."
    return ""


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
            raise MnistError(_how_to_fix(raw) + _one_level_off(root))
    else:
        raw = _download(cache or Path.home() / ".cache" / "aevae")
    contents = read_verified(raw)

    def split(prefix: str) -> Split:
        return Split(pad(_parse_idx(f"{prefix}-images-idx3-ubyte", contents[f"{prefix}-images-idx3-ubyte"])),
                     _parse_idx(f"{prefix}-labels-idx1-ubyte", contents[f"{prefix}-labels-idx1-ubyte"]))

    digests = {name: sha for name, (_, sha, _, _) in FILES.items()}  # each file's, checked by read_verified
    return Mnist(train=split("train"), test=split("t10k"), source=str(raw.resolve()), sha256=digests)
