"""What a batch job reads: rows [start, stop) of latents or images, from a file or generated, in any worker.

A source holds only its parameters (paths, ranges, seeds), so it pickles small and every worker opens the file
itself; `read(start, stop)` returns the same rows wherever and however often it is called, which is what makes
shards retryable and reruns resumable. `check()` runs on the driver before the job starts and refuses what no
worker could process (a wrong latent width, NaN, a wrong image shape), naming the first bad row.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from aevae.errors import UserError
from aevae.finite import past_float32
from aevae.services.inputs import LATENT_BOUND

SCAN_ROWS = 1 << 20  # rows per step of the driver's scan for NaN, shape and range
PRIOR_BLOCK = 4096  # prior samples come in blocks seeded by (seed, block): independent of the shard size
PAD = 2  # a model's image shape may be fed its shape before padding (28 x 28 for 32 x 32), as MNIST is


class Source:
    """Rows of one field ("latent" or "image", plus "label" when the source has labels). `--limit N` lowers
    `rows`: only the first N rows are read and checked."""

    field = "latent"
    rows = 0

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What identifies the input: a rerun into the same output must describe the same input. For files this
        is where they are and how many rows they hold, not their size or modification time: a file fixed in
        place (a bad row corrected) is still this job's input, and the job resumes after checking each finished
        shard against it (`input_files`, and job.prepare)."""
        raise NotImplementedError

    def input_files(self) -> list[Path]:
        """The files the rows come from (none for generated rows, whose parameters fix them): when one of them
        changes between two runs, the rerun checks the finished shards' input rows before keeping them."""
        return []

    def check(self, latent_dim: int, image_shape: tuple[int, int]) -> None:
        """UserError when some row could not be processed. Generated sources are right by construction."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}  # caches stay behind


# -- files ------------------------------------------------------------------------------------------------------

def resolve_path(path: str | os.PathLike[str], flag: str) -> Path:
    """`path` made absolute, symlinks followed; a symlink loop (RuntimeError on Python 3.11, OSError later)
    is a UserError naming the flag, not a traceback. The workers open the absolute path, whatever their cwd."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:
        raise UserError(f"{flag} {path}: cannot follow its symlinks ({exc}); name a file or folder") from None


def input_kind(path: Path, shown: str | os.PathLike[str], folder: bool = False) -> str:
    """"file", or "folder" when `folder` allows one: what --input names (resolved). Else a UserError saying what
    it is: missing, a folder, a FIFO or a device ("no such file" for all of them misled), or a path the system
    refuses, by its errno's text as --output says it (a name over 255 bytes was pathlib's OSError traceback)."""
    wanted = "file or folder" if folder else "file"
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"--input {shown}: no such {wanted}") from None
    except OSError as exc:
        raise UserError(f"--input {shown}: {exc.strerror or exc}") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        if folder:
            return "folder"
        raise UserError(f"--input {shown}: is a folder, not a file")
    raise UserError(f"--input {shown}: is not a regular {wanted}")


def _npz_member(path: Path, key: str | None, field: str) -> str:
    with zipfile.ZipFile(path) as z:
        keys = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    if key is not None:
        if key not in keys:
            raise UserError(f"{path}: no array {key!r} (it holds {', '.join(keys) or 'none'})")
        return key
    preferred = ("latents", "latent", "z") if field == "latent" else ("images", "image", "x")
    if not keys:
        raise UserError(f"{path} holds no arrays (no .npy member): not a numpy .npz file")
    if len(keys) == 1:
        return keys[0]
    for name in preferred:
        if name in keys:
            return name
    raise UserError(f"{path} holds several arrays ({', '.join(keys)}): name one with --key")


def _open_npz(path: Path, key: str) -> np.ndarray:
    """The member as a read-only memory map when it is stored uncompressed (np.savez), else loaded whole."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{key}.npy")
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            header = f.read(30)
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        if not fortran and not dtype.hasobject:
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    with np.load(path, allow_pickle=False) as data:
        return data[key]


class ArrayFile(Source):
    """A .npy file (memory-mapped) or one array of a .npz file."""

    def __init__(self, path: str | os.PathLike[str], field: str = "latent", key: str | None = None):
        self.path = resolve_path(path, "--input")
        self.field = field
        input_kind(self.path, path)
        self.npz = self.path.suffix == ".npz"
        kind = ".npz" if self.npz else ".npy"
        try:
            if not self.npz:
                with open(self.path, "rb") as f:
                    # np.load takes a file without numpy's magic for a pickle and says that it holds objects
                    if f.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
                        raise ValueError("it does not start with numpy's header (written by np.save)")
            self.key = _npz_member(self.path, key, field) if self.npz else None
            shape = self._array().shape
        # EOFError: an empty file; zlib.error: a compressed member whose data is damaged
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise UserError(f"--input {path}: not a readable {kind} file: {exc}") from None
        self.shape = tuple(int(s) for s in shape)
        self.rows = self.shape[0] if self.shape else 0

    def _array(self) -> np.ndarray:
        array = self.__dict__.get("_cache")
        if array is None:
            array = _open_npz(self.path, str(self.key)) if self.npz else np.load(self.path, mmap_mode="r",
                                                                            allow_pickle=False)
            self._cache = array
        return array

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        rows = np.asarray(self._array()[start:stop])
        if self.field == "latent":
            return {"latent": np.ascontiguousarray(rows, dtype=np.float32)}
        return {"image": np.ascontiguousarray(rows)}

    def describe(self) -> dict[str, Any]:
        return {"kind": "npz" if self.npz else "npy", "path": str(self.path), "key": self.key, "rows": self.rows}

    def input_files(self) -> list[Path]:
        return [self.path]

    def check(self, latent_dim: int, image_shape: tuple[int, int]) -> None:
        array = self._array()[:self.rows]
        where = f"--input {self.path.name}" + (f" (array {self.key!r})" if self.key else "")
        if self.field == "latent":
            _check_latent_array(array, latent_dim, where)
        else:
            _check_image_array(array, image_shape, where)


class ParquetFile(Source):
    """One column of a Parquet file or a folder of them (in file-name order): latents as a list or
    fixed-size-list column (or several scalar columns, comma-separated), images as PNG bytes, raw bytes or a
    list of uint8."""

    def __init__(self, path: str | os.PathLike[str], field: str = "latent", column: str | None = None,
                 image_shape: tuple[int, int] | None = None):
        import pyarrow.parquet as pq

        self.path = resolve_path(path, "--input")
        self.field = field
        self.image_shape = image_shape
        if input_kind(self.path, path, folder=True) == "folder":
            self.files = sorted(str(p) for p in self.path.glob("*.parquet"))
        else:
            self.files = [str(self.path)]
        if not self.files:
            raise UserError(f"--input {path}: the folder holds no .parquet files")
        groups, schemas = [], []
        for i, name in enumerate(self.files):
            try:
                opened = pq.ParquetFile(name)
                schemas.append(opened.schema_arrow)
                meta = opened.metadata
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a file that is not Parquet
                where = path if name == str(self.path) else f"{path}: {Path(name).name}"
                raise UserError(f"--input {where}: not readable as Parquet: {' '.join(str(exc).split())}") from None
            groups += [(i, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        schema = schemas[0]
        names = schema.names
        default = "latent" if field == "latent" else "image"
        self.columns = [c.strip() for c in (column or default).split(",") if c.strip()]
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise UserError(f"--input {path}: no column {', '.join(map(repr, missing))}; its columns: "
                            f"{', '.join(names)} (choose with --column)")
        # The files of a folder are read as one table: a file whose column is missing or of another type (rows of
        # 5 values where the first file has 4) failed in the middle of the check with Arrow's several-line
        # "Schema at index 1 was different". Named here, with the file, from their footers alone.
        for name, other in zip(self.files[1:], schemas[1:]):
            for c in self.columns + (["label"] if field == "image" and "label" in names else []):
                theirs = other.field(c).type if c in other.names else None
                if theirs != schema.field(c).type:
                    got = f"{c!r} of type {theirs}" if theirs is not None else f"no column {c!r}"
                    raise UserError(f"--input {path}: {Path(name).name} has {got}, {Path(self.files[0]).name} "
                                    f"{c!r} of type {schema.field(c).type}; every file of the folder must have "
                                    "the same columns")
        self.label = field == "image" and "label" in names
        self.groups = groups  # (file index, row group, rows), in order
        self.starts = np.cumsum([0] + [g[2] for g in groups])
        self.rows = int(self.starts[-1])
        shape = (schema.metadata or {}).get(b"aevae.image_shape")
        if shape and field == "image" and image_shape is None:
            h, w = (int(s) for s in shape.decode().split("x"))
            self.image_shape = (h, w)

    def _table(self, start: int, stop: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = self.__dict__.setdefault("_open", {})
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        columns = self.columns + (["label"] if self.label else [])
        for k in range(max(0, first), len(self.groups)):
            if self.starts[k] >= stop:
                break
            file_index, group, _ = self.groups[k]
            if file_index not in files:
                files[file_index] = pq.ParquetFile(self.files[file_index])
            table = files[file_index].read_row_group(group, columns=columns)
            lo, hi = max(start, self.starts[k]) - self.starts[k], min(stop, self.starts[k + 1]) - self.starts[k]
            parts.append(table.slice(lo, hi - lo))
        return pa.concat_tables(parts) if parts else None

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        table = self._table(start, stop)
        n = stop - start
        out: dict[str, np.ndarray] = {}
        if self.field == "latent":
            out["latent"] = _latents_from_columns([table.column(c) for c in self.columns], n, start)
        else:
            out["image"] = _images_from_column(table.column(self.columns[0]), n, self.image_shape, start)
            if self.label:
                out["label"] = table.column("label").to_numpy()
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": "parquet", "columns": self.columns, "rows": self.rows, "files": list(self.files)}

    def input_files(self) -> list[Path]:
        return [Path(f) for f in self.files]

    def check(self, latent_dim: int, image_shape: tuple[int, int]) -> None:
        where = f"--input {self.path.name} column {','.join(self.columns)}"
        if self.field == "image" and self.image_shape is None:
            self.image_shape = image_shape
        for start in range(0, self.rows, SCAN_ROWS):
            stop = min(self.rows, start + SCAN_ROWS)
            try:
                rows = self.read(start, stop)[self.field]
            except (ValueError, TypeError, OSError) as exc:
                raise UserError(f"{where}: {exc}") from None
            if self.field == "latent":
                _check_latent_array(rows, latent_dim, where, offset=start)
            else:
                _check_image_array(rows, image_shape, where, offset=start)


def _numbers(kind: Any) -> bool:
    """Integers or floats: what a latent is made of (bool, strings or nested lists are refused naming their type,
    as an array file's are, not cast or failed on with numpy's "setting an array element with a sequence")."""
    import pyarrow as pa

    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _latents_from_columns(columns: list, n: int, first: int = 0) -> np.ndarray:
    import pyarrow as pa

    if len(columns) > 1:  # one scalar column per dimension
        for c in columns:
            if not _numbers(c.type):
                raise ValueError(f"expected one column of numbers per dimension, got one of {c.type}")
            if c.null_count:  # to_numpy makes a null NaN, which the check then called "NaN or infinity"
                raise ValueError("a column has null rows; every latent must be a number")
        return _as_float32(np.stack([c.to_numpy() for c in columns], axis=1), first)
    array = columns[0].combine_chunks()
    if not (pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type)
            or pa.types.is_large_list(array.type)) or not _numbers(array.type.value_type):
        raise ValueError(f"expected a list column of numbers, got {array.type}")
    if array.null_count:
        raise ValueError("the column has null rows")
    return _as_float32(_list_values(array, first).reshape(n, -1 if n else 0), first)


def _as_float32(rows: np.ndarray, first: int = 0) -> np.ndarray:
    """Latent rows (the input's from `first`) as float32; ValueError naming the first row of values beyond
    float32's range (cast, they became infinity with numpy's overflow warning, and were called "NaN or
    infinity")."""
    where = past_float32(rows)
    if where is not None:
        raise ValueError(f"row {first + where[0]} holds values beyond float32's range ({rows[where[0]].tolist()}); "
                         f"latents must lie in [-{LATENT_BOUND:g}, {LATENT_BOUND:g}]")
    return rows.astype(np.float32, copy=False)


def _list_values(array, first: int = 0) -> np.ndarray:
    """The values of a list column's rows (the input's rows from `first`), flattened, once every row is known
    to hold as many as the first. Checking only that the total divides by the row count is not enough: rows of
    3 and 5 values would be cut into two rows of 4, every value after the first row shifted, and decoded (or
    encoded) without a word."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(array) and not pa.types.is_fixed_size_list(array.type):
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        odd = np.flatnonzero(lengths != lengths[0])
        if len(odd):
            raise ValueError(f"row {first + int(odd[0])} holds {int(lengths[odd[0]])} values and row {first} "
                             f"{int(lengths[0])}; every row must hold the same number")
    values = array.flatten()
    if values.null_count:  # to_numpy makes a null NaN, which the check then called "NaN or infinity"
        width = len(values) // max(1, len(array))
        at = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"row {first + at // max(1, width)} holds a null value; every value must be a number")
    return values.to_numpy(zero_copy_only=False)


def _images_from_column(column, n: int, image_shape: tuple[int, int] | None, first: int = 0) -> np.ndarray:
    import pyarrow as pa

    from aevae.batch import png

    array = column.combine_chunks()
    if array.null_count:
        raise ValueError("the column has null rows")
    if pa.types.is_fixed_size_binary(array.type):
        width = array.type.byte_width
        flat = np.frombuffer(array.buffers()[1], np.uint8, count=n * width, offset=array.offset * width)
        return flat.reshape(n, *_shape_for(width, image_shape))
    if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
        return png.decode_many(array.to_pylist(), first)
    if pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type):
        values = _list_values(array, first)
        return values.reshape(n, *_shape_for(len(values) // max(1, n), image_shape))
    raise ValueError(f"expected PNG bytes, raw bytes or a list of pixels, got {array.type}")


def _shape_for(pixels: int, image_shape: tuple[int, int] | None) -> tuple[int, int]:
    if image_shape is not None:
        h, w = image_shape
        for shape in ((h, w), (h - 2 * PAD, w - 2 * PAD)):
            if shape[0] * shape[1] == pixels:
                return shape
    side = math.isqrt(pixels)
    if side * side != pixels:
        raise ValueError(f"rows of {pixels} pixels are no square image; the model takes {image_shape}")
    return side, side


def _check_latent_array(array: np.ndarray, latent_dim: int, where: str, offset: int = 0) -> None:
    if array.ndim != 2 or array.shape[1] != latent_dim:
        got = "x".join(map(str, array.shape[1:])) or "scalars"
        raise UserError(f"{where}: the model takes N x {latent_dim} latents, got rows of {got} "
                        f"(shape {list(array.shape)})")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise UserError(f"{where}: latents must be numbers, got {array.dtype}")
    for start in range(0, len(array), SCAN_ROWS):
        try:
            chunk = _as_float32(np.asarray(array[start:start + SCAN_ROWS]), offset + start)
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None
        bad = ~np.isfinite(chunk).all(axis=1)
        if bad.any():
            first = int(np.argmax(bad))
            raise UserError(f"{where}: row {offset + start + first} holds NaN or infinity "
                            f"({chunk[first].tolist()}); every latent must be finite")


def accepted_shapes(image_shape: tuple[int, int]) -> list[tuple[int, int]]:
    h, w = image_shape
    return [(h, w)] + ([(h - 2 * PAD, w - 2 * PAD)] if h > 2 * PAD and w > 2 * PAD else [])


def _check_image_array(array: np.ndarray, image_shape: tuple[int, int], where: str, offset: int = 0) -> None:
    shapes = accepted_shapes(image_shape)
    if array.ndim != 3 or tuple(array.shape[1:]) not in shapes:
        raise UserError(f"{where}: the model takes N x {' or '.join('x'.join(map(str, s)) for s in shapes)} images, "
                        f"got shape {list(array.shape)}")
    if array.dtype == np.uint8:
        return
    if not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"{where}: images must be uint8 (0..255) or float in [0, 1], got {array.dtype}")
    for start in range(0, len(array), SCAN_ROWS // 64):
        chunk = np.asarray(array[start:start + SCAN_ROWS // 64])
        bad = ~((chunk >= 0) & (chunk <= 1)).reshape(len(chunk), -1).all(axis=1)  # NaN fails both
        if bad.any():
            row = offset + start + int(np.argmax(bad))
            raise UserError(f"{where}: image {row} has pixels outside [0, 1] or NaN; float images must be in [0, 1]")


# -- MNIST ------------------------------------------------------------------------------------------------------

_MNIST: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


class MnistImages(Source):
    """The MNIST files (padded to 32 x 32, with their labels): split train, test or all (train, then test)."""

    field = "image"
    SIZES = {"train": 60000, "test": 10000, "all": 70000}

    def __init__(self, data_root: str | None, split: str):
        from aevae import mnist

        if split not in self.SIZES:
            raise UserError(f"--mnist takes train, test or all, got {split!r}")
        root = mnist.resolve_root(data_root)
        self.data_root = str(root.resolve()) if root else None
        self.split = split
        self.rows = self.SIZES[split]

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        from aevae import mnist

        key = (str(self.data_root), self.split)
        if key not in _MNIST:
            try:
                data = mnist.load(self.data_root)
            except mnist.MnistError as exc:  # one line: a failed download's text holds torchvision's several
                raise UserError(" ".join(str(exc).split())) from None
            parts = {"train": [data.train], "test": [data.test], "all": [data.train, data.test]}[self.split]
            _MNIST[key] = (np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
        return _MNIST[key]

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        images, labels = self._arrays()
        return {"image": images[start:stop], "label": labels[start:stop].astype(np.int64)}

    def describe(self) -> dict[str, Any]:
        return {"kind": "mnist", "split": self.split, "rows": self.rows}

    def check(self, latent_dim: int, image_shape: tuple[int, int]) -> None:
        images, _ = self._arrays()  # verifies the files' checksums
        if tuple(images.shape[1:]) not in accepted_shapes(image_shape):
            raise UserError(f"--mnist: the model takes {image_shape[0]}x{image_shape[1]} images, MNIST is "
                            f"{images.shape[1]}x{images.shape[2]}")


# -- generated latents ------------------------------------------------------------------------------------------

def parse_range(text: str, what: str) -> tuple[float, float, int]:
    """"lo:hi:steps" -> (lo, hi, steps); steps >= 1 (one step: lo only)."""
    try:
        lo, hi, steps = text.split(":")
        result = float(lo), float(hi), int(steps)
    except ValueError:
        raise UserError(f"{what}: expected LO:HI:STEPS such as -3:3:11, got {text!r}") from None
    if not all(abs(v) <= LATENT_BOUND for v in result[:2]) or result[2] < 1:  # nan fails abs(v) <= bound
        raise UserError(f"{what}: LO and HI must lie in [-{LATENT_BOUND:g}, {LATENT_BOUND:g}] (the services' bound on "
                        f"latents) and STEPS must be at least 1, got {text!r}")
    return result


def _values(lo: float, hi: float, steps: int, index: np.ndarray) -> np.ndarray:
    if steps == 1:
        return np.full(index.shape, lo, np.float32)
    return (lo + index * ((hi - lo) / (steps - 1))).astype(np.float32)


class Grid(Source):
    """Every point of a grid: one LO:HI:STEPS range per dimension (or one for all); the last dimension varies
    fastest."""

    def __init__(self, ranges: list[tuple[float, float, int]]):
        self.ranges = [(float(lo), float(hi), int(steps)) for lo, hi, steps in ranges]
        self.rows = math.prod(r[2] for r in ranges)  # Python ints: numpy's int64 would wrap a huge grid around

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        index = np.unravel_index(np.arange(start, stop), [r[2] for r in self.ranges])
        z = np.stack([_values(lo, hi, steps, i) for (lo, hi, steps), i in zip(self.ranges, index)], axis=1)
        return {"latent": z}

    def describe(self) -> dict[str, Any]:
        return {"kind": "grid", "ranges": [list(r) for r in self.ranges]}


MAX_SCALE = LATENT_BOUND / 10  # ten standard deviations stay within the services' bound on latents


def check_prior(seed: int, scale: float) -> None:
    """UserError unless the prior's parameters can make every row: numpy seeds only with whole numbers from 0
    up, and samples must stay within the services' bound on latents (+-LATENT_BOUND), which a scale above
    MAX_SCALE would break in some row (beyond ten standard deviations: about once in 1e23 values) or, as
    float32, everywhere. Checked here, before a job starts, not by the first worker that draws a block."""
    if seed < 0:
        raise UserError(f"--seed must be a whole number from 0 up, got {seed}")
    if not (0 < scale <= MAX_SCALE) or not np.float32(scale) > 0:  # nan fails both; 1e-50 is 0 as float32
        raise UserError(f"--scale must be positive and at most {MAX_SCALE:g} (ten standard deviations within the "
                        f"services' bound on latents, +-{LATENT_BOUND:g}), got {scale:g}")


class Prior(Source):
    """N samples from the prior N(0, scale^2 I), seeded: row i is the same for any shard size or engine."""

    def __init__(self, count: int, seed: int, latent_dim: int, scale: float = 1.0):
        check_prior(int(seed), float(scale))
        self.rows, self.seed, self.latent_dim, self.scale = int(count), int(seed), int(latent_dim), float(scale)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        blocks = []
        for block in range(start // PRIOR_BLOCK, (stop - 1) // PRIOR_BLOCK + 1):
            rng = np.random.default_rng([self.seed, block])
            blocks.append(rng.standard_normal((PRIOR_BLOCK, self.latent_dim), dtype=np.float32))
        z = np.concatenate(blocks)
        first = start - (start // PRIOR_BLOCK) * PRIOR_BLOCK
        z = z[first:first + stop - start]
        return {"latent": z * np.float32(self.scale) if self.scale != 1 else np.ascontiguousarray(z)}

    def describe(self) -> dict[str, Any]:
        return {"kind": "prior", "rows": self.rows, "seed": self.seed, "scale": self.scale}


class Traversal(Source):
    """For each base latent (the origin when there are none), each dimension swept over LO:HI:STEPS with the
    others held: rows ordered by base, then dimension, then step."""

    def __init__(self, sweep: tuple[float, float, int], latent_dim: int, bases: Source | None = None):
        self.sweep = (float(sweep[0]), float(sweep[1]), int(sweep[2]))
        self.latent_dim = int(latent_dim)
        self.bases = bases
        per_base = self.latent_dim * self.sweep[2]
        self.rows = (bases.rows if bases is not None else 1) * per_base

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        lo, hi, steps = self.sweep
        per_base = self.latent_dim * steps
        index = np.arange(start, stop)
        base_index = index // per_base
        first, last = int(base_index[0]), int(base_index[-1]) + 1
        if self.bases is None:
            bases = np.zeros((1, self.latent_dim), np.float32)
        else:
            bases = self.bases.read(first, last)["latent"]
        z = bases[base_index - first].copy()
        dim = (index // steps) % self.latent_dim
        z[np.arange(len(z)), dim] = _values(lo, hi, steps, index % steps)
        return {"latent": z}

    def describe(self) -> dict[str, Any]:
        return {"kind": "traversal", "sweep": list(self.sweep),
                "bases": None if self.bases is None else self.bases.describe()}

    def input_files(self) -> list[Path]:
        return [] if self.bases is None else self.bases.input_files()

    def check(self, latent_dim: int, image_shape: tuple[int, int]) -> None:
        if self.bases is not None:
            self.bases.check(latent_dim, image_shape)


def chunks(rows: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, rows, size):
        yield start, min(rows, start + size)
