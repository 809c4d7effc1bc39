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

Every shard also carries the digest of the input rows it was made from (`input_digest`: Parquet schema metadata
`aevae.input_digest`, an npz array `input_digest`, a `.input-digest` file in a PNG folder). It is written with
the shard, inside the same atomic rename, so a shard on disk always says which rows it was computed from, however
the run that wrote it ended (a killed worker, Ctrl-C): a rerun after the input file changed keeps exactly the
shards whose rows are unchanged (job.prepare).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from aevae.batch import png
from aevae.batch.sources import resolve_path
from aevae.repository import fsync_path

FORMATS = ("parquet", "npz", "png")
IMAGE_FORMATS = ("raw", "png")
SUFFIX = {"parquet": ".parquet", "npz": ".npz", "png": ""}
TMP_MARK = ".tmp-"
DIGEST_KEY = "aevae.input_digest"  # Parquet schema metadata
DIGEST_FILE = ".input-digest"  # in a PNG shard's folder (hidden: not one of its images)
SHARD_NAME = re.compile(r"part-[0-9]{6,}(\.parquet|\.npz)?")  # a shard of any format: Sink.name


def shard_entries(root: Path) -> list[Path]:
    """The shards in `root` whatever their format (part-000000.parquet, .npz, or a PNG folder part-000000):
    what replacing the job there deletes, so what its job file protects from a command that differs (in
    --format, say) and would find none of its own shards there. Other files (part-notes.txt) are no shards."""
    with os.scandir(root) as entries:
        return [Path(e.path) for e in entries if SHARD_NAME.fullmatch(e.name)]


class Sink:
    def __init__(self, root: str | os.PathLike[str], fmt: str, image_format: str = "raw",
                 meta: dict[str, Any] | None = None, id_digits: int = 9):
        self.root = resolve_path(root, "--output")
        self.format = fmt
        self.image_format = image_format
        self.meta = dict(meta or {})
        self.id_digits = id_digits

    def name(self, shard: int) -> str:
        return f"part-{shard:06d}{SUFFIX[self.format]}"

    def path(self, shard: int) -> Path:
        return self.root / self.name(shard)

    def parts(self) -> dict[int, Path]:
        """The shards that have an entry in the folder, by index: one listing of the folder, so that finding what
        a rerun can skip costs what is on disk, not one probe per shard of the job."""
        found: dict[int, Path] = {}
        suffix = SUFFIX[self.format]
        with os.scandir(self.root) as entries:
            for entry in entries:
                digits = entry.name[5:len(entry.name) - len(suffix)] if entry.name.startswith("part-") else ""
                if digits.isdigit() and entry.name == self.name(int(digits)):
                    found[int(digits)] = Path(entry.path)
        return found

    def done(self, shard: int, rows: int) -> bool:
        """True when the shard is on disk whole (a damaged file counts as not done, and is rewritten)."""
        path = self.path(shard)
        try:
            if self.format == "parquet":
                import pyarrow.parquet as pq

                return pq.ParquetFile(path).metadata.num_rows == rows
            if self.format == "npz":  # the ids' header alone: a shard of other rows (a copy) is not done
                with zipfile.ZipFile(path) as z, z.open("ids.npy") as f:
                    major, _ = np.lib.format.read_magic(f)
                    header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    return header(f)[0][:1] == (rows,)
            # an empty image is one whose data a power cut lost (the files of a PNG shard are not flushed)
            return path.is_dir() and sum(1 for e in os.scandir(path)
                                         if e.name.endswith(".png") and e.stat().st_size > 0) == rows
        except Exception:  # noqa: BLE001 - missing or unreadable: not done
            return False

    def intact(self, shard: int, start: int, stop: int) -> bool:
        """Whether the shard's data reads back whole and holds the ids `start` to `stop` (`--verify`): a Parquet
        shard's pages against their CRCs (written with each page; they cover a page's data, not its header or
        the footer, which `done` and the read parse), an NPZ shard's arrays against the zip's CRCs, each PNG of
        a shard folder against its chunks' CRCs, and the ids (the PNG files' names) against the shard's rows,
        so that another shard's file copied over it is found too. `done` reads only a shard's index, so a shard
        damaged inside a whole file (a disk fault, an edit) passes it; this reads all of it."""
        path = self.path(shard)
        expected = np.arange(start, stop)
        try:
            if self.format == "parquet":
                import pyarrow.parquet as pq

                with open(path, "rb") as f:
                    if f.read(4) != b"PAR1":  # the leading magic, which pyarrow's reader does not check
                        return False
                table = pq.read_table(path, page_checksum_verification=True)
                return np.array_equal(table.column("id").to_numpy(), expected)
            if self.format == "npz":
                with zipfile.ZipFile(path) as z:
                    if z.testzip() is not None:
                        return False
                with np.load(path, allow_pickle=False) as data:
                    return np.array_equal(data["ids"], expected)
            names = sorted(e.name for e in os.scandir(path) if e.name.endswith(".png"))
            if names != [f"{int(i):0{self.id_digits}d}.png" for i in expected]:
                return False
            return all(png.intact((path / name).read_bytes()) for name in names)
        except Exception:  # noqa: BLE001 - what does not read is not intact
            return False

    def digest(self, shard: int) -> str | None:
        """The digest of the input rows the shard was made from, as written with it; None when it has none (or
        cannot be read), which a caller checking the shard must take as "not the same rows"."""
        path = self.path(shard)
        try:
            if self.format == "parquet":
                import pyarrow.parquet as pq

                value = (pq.ParquetFile(path).schema_arrow.metadata or {}).get(DIGEST_KEY.encode())
                return None if value is None else value.decode()
            if self.format == "npz":
                with np.load(path, allow_pickle=False) as data:
                    return str(data["input_digest"]) if "input_digest" in data.files else None
            return (path / DIGEST_FILE).read_text().strip()
        except Exception:  # noqa: BLE001 - missing or unreadable: unknown
            return None

    def remove(self, shard: int) -> None:
        path = self.path(shard)
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def clean(self) -> int:
        """Removes temporary files of interrupted writers; returns how many."""
        removed = 0
        for entry in self.root.glob(f".part-*{TMP_MARK}*"):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def write(self, shard: int, columns: dict[str, np.ndarray], digest: str | None = None) -> int:
        """Writes one shard atomically, with `digest` (of the input rows it was made from, job.input_digest);
        returns its size in bytes."""
        final = self.path(shard)
        tmp = self.root / f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:12]}"
        try:
            if self.format == "parquet":
                self._parquet(tmp, columns, digest)
            elif self.format == "npz":
                arrays: dict[str, Any] = {_NPZ_NAMES.get(k, k): v for k, v in columns.items()}
                if digest is not None:
                    arrays["input_digest"] = np.array(digest)
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)
            else:
                self._pngs(tmp, columns)
                if digest is not None:
                    (tmp / DIGEST_FILE).write_text(digest + "\n")
            size = _size(tmp)
            if tmp.is_dir():
                _replace_folder(tmp, final)
            else:
                # the data on the disk before the name: after a power cut a rename could be there without it,
                # a complete-looking shard that done() would not make again. (A PNG shard's thousands of files
                # are not each flushed, at about 0.3 ms a file; done() counts an empty one as missing instead.)
                fsync_path(tmp)
                os.replace(tmp, final)
            return size
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            raise

    def _parquet(self, path: Path, columns: dict[str, np.ndarray], digest: str | None) -> None:
        import pyarrow.parquet as pq

        table = arrow_table(columns, self.image_format, self.meta)
        if digest is not None:
            table = table.replace_schema_metadata({**table.schema.metadata, DIGEST_KEY.encode(): digest.encode()})
        # zstd level 1: 30 % smaller than snappy on decoded digits and no slower (measured); dictionaries
        # do not pay for unique images
        pq.write_table(table, path, compression="zstd", compression_level=1, use_dictionary=False,
                       write_statistics=["id"], write_page_checksum=True)  # CRCs for `intact`

    def _pngs(self, folder: Path, columns: dict[str, np.ndarray]) -> None:
        folder.mkdir()
        for i, blob in zip(columns["id"], png.encode_many(columns["image"])):
            (folder / f"{int(i):0{self.id_digits}d}.png").write_bytes(blob)


_NPZ_NAMES = {"id": "ids", "latent": "latents", "image": "images", "label": "labels"}


def _replace_folder(tmp: Path, final: Path) -> None:
    """os.replace for a shard's folder (PNG). rename() cannot replace a folder that holds files, and keeping the
    one in place would keep a damaged shard (files deleted) that a rerun makes again while the job counts it
    written; so the folder in place is moved aside under a temporary name (which clean() removes after a crash)
    and the new one renamed in: the shard's name never holds a partial folder."""
    moved: list[Path] = []
    try:
        for attempt in range(3):  # another writer of the same shard (a retried task) may move it between steps
            try:
                os.rename(tmp, final)
                return
            except OSError:
                if attempt == 2 or not final.is_dir():
                    raise
            old = final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")
            try:
                os.rename(final, old)
                moved.append(old)
            except FileNotFoundError:  # the other writer moved it first
                pass
    finally:
        for old in moved:
            shutil.rmtree(old, ignore_errors=True)


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
