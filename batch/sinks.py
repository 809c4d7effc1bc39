"""Where a batch job writes: one file (or folder) per shard, named by the shard's index, written atomically.

A shard is written under a hidden temporary name and renamed into place, so a shard on disk is complete and a
shard written twice (a retried task, a rerun) is the same shard, never a duplicate. Reading the files in name
order gives the rows in input order; every row also carries its id (its index in the input).

- parquet: `part-000000.parquet`, ... with columns id (int64), latent (fixed-size list of float32) and image
  (raw: fixed-size binary of H*W uint8 pixels, row-major; png: PNG bytes); encode jobs: id, latent (the mean),
  logvar (VAE), label (when the input has labels). The schema metadata holds the job (key `aevae`) and the
  image shape (`aevae.image_shape`, "32x32").
- npz: `part-000000.npz` with arrays ids, latents, images (N x H x W uint8); encode jobs: ids, latents, logvar,
  labels.
- png: `part-000000/` folders of `<id>.png`, grey 8-bit (decode jobs only).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from aevae.batch import png

FORMATS = ("parquet", "npz", "png")
IMAGE_FORMATS = ("raw", "png")
SUFFIX = {"parquet": ".parquet", "npz": ".npz", "png": ""}
TMP_MARK = ".tmp-"


class Sink:
    def __init__(self, root: str | os.PathLike[str], fmt: str, image_format: str = "raw",
                 meta: dict[str, Any] | None = None, id_digits: int = 9):
        self.root = Path(root).expanduser().resolve()
        self.format = fmt
        self.image_format = image_format
        self.meta = dict(meta or {})
        self.id_digits = id_digits

    def name(self, shard: int) -> str:
        return f"part-{shard:06d}{SUFFIX[self.format]}"

    def path(self, shard: int) -> Path:
        return self.root / self.name(shard)

    def done(self, shard: int, rows: int) -> bool:
        """True when the shard is on disk whole (a damaged file counts as not done, and is rewritten)."""
        path = self.path(shard)
        try:
            if self.format == "parquet":
                import pyarrow.parquet as pq

                return pq.ParquetFile(path).metadata.num_rows == rows
            if self.format == "npz":
                with zipfile.ZipFile(path) as z:
                    return "ids.npy" in z.namelist()
            return path.is_dir() and sum(1 for _ in os.scandir(path)) == rows
        except Exception:  # noqa: BLE001 - missing or unreadable: not done
            return False

    def clean(self) -> int:
        """Removes temporary files of interrupted writers; returns how many."""
        removed = 0
        for entry in self.root.glob(f".part-*{TMP_MARK}*"):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def write(self, shard: int, columns: dict[str, np.ndarray]) -> int:
        """Writes one shard atomically; returns its size in bytes."""
        final = self.path(shard)
        tmp = self.root / f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:12]}"
        try:
            if self.format == "parquet":
                self._parquet(tmp, columns)
            elif self.format == "npz":
                arrays: dict[str, Any] = {_NPZ_NAMES.get(k, k): v for k, v in columns.items()}
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)
            else:
                self._pngs(tmp, columns)
            size = _size(tmp)
            if tmp.is_dir():
                try:
                    os.rename(tmp, final)
                except OSError:  # a folder of the same shard is already in place: the same rows
                    if not final.is_dir():
                        raise
                    shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, final)
            return size
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            raise

    def _parquet(self, path: Path, columns: dict[str, np.ndarray]) -> None:
        import pyarrow.parquet as pq

        table = arrow_table(columns, self.image_format, self.meta)
        # zstd level 1: 30 % smaller than snappy on decoded digits and no slower (measured); dictionaries
        # do not pay for unique images
        pq.write_table(table, path, compression="zstd", compression_level=1, use_dictionary=False,
                       write_statistics=["id"])

    def _pngs(self, folder: Path, columns: dict[str, np.ndarray]) -> None:
        folder.mkdir()
        for i, blob in zip(columns["id"], png.encode_many(columns["image"])):
            (folder / f"{int(i):0{self.id_digits}d}.png").write_bytes(blob)


_NPZ_NAMES = {"id": "ids", "latent": "latents", "image": "images", "label": "labels"}


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(e.stat().st_size for e in os.scandir(path))
    return path.stat().st_size


def arrow_table(columns: dict[str, np.ndarray], image_format: str, meta: dict[str, Any]):
    import pyarrow as pa

    arrays, names = [], []
    for name, values in columns.items():
        if name == "image":
            n, h, w = values.shape
            if image_format == "png":
                array = pa.array(png.encode_many(values), type=pa.binary())
            else:
                data = np.ascontiguousarray(values, dtype=np.uint8)
                array = pa.Array.from_buffers(pa.binary(h * w), n, [None, pa.py_buffer(data)])
        elif values.ndim == 2:  # latent, logvar
            flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
            array = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        else:
            array = pa.array(values)
        arrays.append(array)
        names.append(name)
    metadata = {"aevae": json.dumps(meta)}
    if "image" in columns:
        metadata["aevae.image_shape"] = "x".join(map(str, columns["image"].shape[1:]))
    return pa.Table.from_arrays(arrays, names=names, metadata=metadata)
