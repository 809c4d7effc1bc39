"""aevae.batch without Ray or services: the sources (files and generated), the sinks, PNG bytes, the checks
that refuse bad input before a job starts, and resuming into an output folder. Shards run in-process through
`run_shard`, the function Ray's actors and the fleet engine call."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aevae.batch import png, sources
from aevae.batch.job import JOB_FILE, Job, prepare, run_shard
from aevae.batch.model import Loaded, resolve
from aevae.batch.sinks import Sink, arrow_table
from aevae.cli import main
from aevae.errors import UserError


def read_parquet(folder: Path) -> pa.Table:
    return pq.read_table(folder)  # files starting with _ or . (the job file, temporaries) are not data


# -- generated sources ------------------------------------------------------------------------------------------

def test_a_grid_enumerates_every_point_last_dimension_fastest() -> None:
    grid = sources.Grid([(-1.0, 1.0, 3), (0.0, 10.0, 2)])
    assert grid.rows == 6
    z = grid.read(0, 6)["latent"]
    np.testing.assert_allclose(z, [[-1, 0], [-1, 10], [0, 0], [0, 10], [1, 0], [1, 10]])
    np.testing.assert_array_equal(grid.read(2, 5)["latent"], z[2:5])


def test_prior_rows_do_not_depend_on_how_the_rows_are_split() -> None:
    prior = sources.Prior(10_000, seed=3, latent_dim=5)
    whole = prior.read(0, 10_000)["latent"]
    assert whole.shape == (10_000, 5) and whole.dtype == np.float32
    pieces = np.concatenate([prior.read(a, b)["latent"] for a, b in [(0, 1), (1, 4097), (4097, 9000), (9000, 10_000)]])
    np.testing.assert_array_equal(pieces, whole)
    assert abs(float(whole.mean())) < 0.05 and 0.95 < float(whole.std()) < 1.05
    assert not np.array_equal(sources.Prior(10, seed=4, latent_dim=5).read(0, 10)["latent"], whole[:10])


def test_a_traversal_sweeps_each_dimension_around_each_base() -> None:
    bases = sources.Grid([(1.0, 2.0, 2), (5.0, 5.0, 1), (7.0, 7.0, 1)])  # bases (1, 5, 7) and (2, 5, 7)
    sweep = sources.Traversal((-1.0, 1.0, 3), latent_dim=3, bases=bases)
    assert sweep.rows == 2 * 3 * 3
    z = sweep.read(0, sweep.rows)["latent"]
    np.testing.assert_allclose(z[:3], [[-1, 5, 7], [0, 5, 7], [1, 5, 7]])  # base 0, dimension 0
    np.testing.assert_allclose(z[3:6], [[1, -1, 7], [1, 0, 7], [1, 1, 7]])  # base 0, dimension 1
    np.testing.assert_allclose(z[15:18], [[2, 5, -1], [2, 5, 0], [2, 5, 1]])  # base 1, dimension 2
    np.testing.assert_array_equal(sweep.read(4, 11)["latent"], z[4:11])
    origin = sources.Traversal((0.0, 2.0, 2), latent_dim=2)
    np.testing.assert_allclose(origin.read(0, 4)["latent"], [[0, 0], [2, 0], [0, 0], [0, 2]])


# -- file sources -----------------------------------------------------------------------------------------------

def test_npy_npz_and_parquet_latents_read_the_same_rows(tmp_path: Path) -> None:
    z = np.random.default_rng(0).normal(size=(1000, 4)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    np.savez(tmp_path / "stored.npz", latents=z, other=np.zeros(3))
    np.savez_compressed(tmp_path / "packed.npz", z=z)
    table = pa.table({"latent": pa.FixedSizeListArray.from_arrays(pa.array(z.ravel()), 4),
                      **{f"z{i}": z[:, i] for i in range(4)}})
    pq.write_table(table, tmp_path / "z.parquet", row_group_size=300)  # rows 250..700 span row groups
    found = {
        "npy": sources.ArrayFile(tmp_path / "z.npy"),
        "npz stored": sources.ArrayFile(tmp_path / "stored.npz"),  # picks "latents" among two arrays
        "npz compressed": sources.ArrayFile(tmp_path / "packed.npz"),
        "parquet list": sources.ParquetFile(tmp_path / "z.parquet"),
        "parquet scalars": sources.ParquetFile(tmp_path / "z.parquet", column="z0,z1,z2,z3"),
    }
    assert isinstance(found["npz stored"]._array(), np.memmap)
    for name, source in found.items():
        assert source.rows == 1000, name
        np.testing.assert_array_equal(source.read(250, 700)["latent"], z[250:700], err_msg=name)
        source.check(4, (32, 32))
    with pytest.raises(UserError, match=r"no array 'nope' \(it holds latents, other\)"):
        sources.ArrayFile(tmp_path / "stored.npz", key="nope")
    np.savez(tmp_path / "two.npz", a=z, b=z)
    with pytest.raises(UserError, match="holds several arrays .* name one with --key"):
        sources.ArrayFile(tmp_path / "two.npz")
    np.testing.assert_array_equal(sources.ArrayFile(tmp_path / "two.npz", key="b").read(0, 5)["latent"], z[:5])


def test_parquet_images_as_raw_bytes_or_png_read_back_exactly(tmp_path: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, size=(50, 24, 20), dtype=np.uint8)
    for fmt in ("raw", "png"):
        table = arrow_table({"id": np.arange(50), "image": images}, fmt, {})
        pq.write_table(table, tmp_path / f"{fmt}.parquet")
        source = sources.ParquetFile(tmp_path / f"{fmt}.parquet", field="image")
        assert source.image_shape == (24, 20)  # from the schema metadata
        np.testing.assert_array_equal(source.read(10, 40)["image"], images[10:40])


def test_png_bytes_are_real_pngs() -> None:
    from PIL import Image

    images = np.random.default_rng(2).integers(0, 256, size=(5, 7, 9), dtype=np.uint8)
    for image, blob in zip(images, png.encode_many(images)):
        with Image.open(io.BytesIO(blob)) as read:
            assert read.mode == "L" and read.size == (9, 7)
            np.testing.assert_array_equal(np.asarray(read), image)


# -- checks before a job starts ---------------------------------------------------------------------------------

def test_bad_latents_are_refused_naming_the_problem(tmp_path: Path) -> None:
    np.save(tmp_path / "wide.npy", np.zeros((10, 5), np.float32))
    with pytest.raises(UserError, match=r"N x 4 latents, got rows of 5"):
        sources.ArrayFile(tmp_path / "wide.npy").check(4, (32, 32))
    z = np.zeros((3_000_000, 4), np.float32)
    z[2_500_001, 2] = np.nan  # in the scan's third step
    np.save(tmp_path / "nan.npy", z)
    with pytest.raises(UserError, match=r"row 2500001 holds NaN or infinity"):
        sources.ArrayFile(tmp_path / "nan.npy").check(4, (32, 32))
    images = np.full((4, 28, 28), 0.5, np.float32)
    images[3, 0, 0] = 1.5
    np.save(tmp_path / "img.npy", images)
    with pytest.raises(UserError, match=r"image 3 has pixels outside \[0, 1\]"):
        sources.ArrayFile(tmp_path / "img.npy", field="image").check(4, (32, 32))
    np.save(tmp_path / "odd.npy", np.zeros((4, 30, 30), np.uint8))
    with pytest.raises(UserError, match=r"32x32 or 28x28 images, got shape \[4, 30, 30\]"):
        sources.ArrayFile(tmp_path / "odd.npy", field="image").check(4, (32, 32))


def test_a_folder_with_one_file_that_is_not_parquet_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"latent": list(np.zeros((3, 4), np.float32))}), folder / f"part{i}.parquet")
    assert sources.ParquetFile(folder).rows == 6
    (folder / "part2.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(UserError, match=r"--input .*in: part2.parquet: not readable as Parquet"):
        sources.ParquetFile(folder)


def test_list_rows_of_different_lengths_are_refused_not_cut_again(tmp_path: Path) -> None:
    """Rows of 3 and 5 values hold 8, which divides into two rows of 4: the reader must refuse them, naming the
    row, not shift every value after the first row and decode (or encode) the result."""
    pq.write_table(pa.table({"latent": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0, 8.0]]}), tmp_path / "z.parquet")
    with pytest.raises(UserError, match=r"column latent: row 1 holds 5 values and row 0 3; every row must hold"):
        sources.ParquetFile(tmp_path / "z.parquet").check(4, (32, 32))
    rows = [[0.0] * 4, [0.0] * 4, [0.0] * 2, [0.0] * 6]  # a read from row 1 names the input's rows
    pq.write_table(pa.table({"latent": rows}), tmp_path / "later.parquet")
    with pytest.raises(ValueError, match=r"row 2 holds 2 values and row 1 4"):
        sources.ParquetFile(tmp_path / "later.parquet").read(1, 4)
    pixels = [[0] * 783, [0] * 785]  # 1,568 pixels: two 28 x 28 images once cut again
    pq.write_table(pa.table({"image": pa.array(pixels, pa.list_(pa.uint8()))}), tmp_path / "x.parquet")
    with pytest.raises(UserError, match=r"row 1 holds 785 values and row 0 783"):
        sources.ParquetFile(tmp_path / "x.parquet", field="image").check(4, (32, 32))


@pytest.mark.parametrize("values, columns, message", [
    ([[[1.0, 2.0], [3.0, 4.0]]], None, "a list column of numbers, got list<element: list<element: double>>"),
    ([[True, False, True, False]], None, "a list column of numbers, got list<element: bool>"),  # as .npy refuses
    ([["a", "b", "c", "d"]], None, "a list column of numbers, got list<element: string>"),
    (["a"], "z0,z1,z2,z3", "one column of numbers per dimension, got one of string"),
])
def test_a_parquet_column_of_other_than_numbers_is_refused_naming_its_type(tmp_path: Path, values: list,
                                                                          columns: str | None, message: str) -> None:
    if columns:
        table = pa.table({"z0": values, "z1": [1.0], "z2": [1.0], "z3": [1.0]})
    else:
        table = pa.table({"latent": values})
    pq.write_table(table, tmp_path / "z.parquet")
    with pytest.raises(UserError, match=r"expected " + re.escape(message)):
        sources.ParquetFile(tmp_path / "z.parquet", column=columns).check(4, (32, 32))


def test_a_damaged_array_file_or_a_symlink_loop_is_one_line_not_a_traceback(tiny_repo: Path, tmp_path: Path,
                                                                            capsys) -> None:
    import zipfile

    (tmp_path / "empty.npy").write_bytes(b"")
    np.savez_compressed(tmp_path / "c.npz", z=np.random.default_rng(0).standard_normal((5000, 4)).astype(np.float32))
    data = bytearray((tmp_path / "c.npz").read_bytes())
    data[200:2000] = bytes(b ^ 0x55 for b in data[200:2000])  # the member's compressed bytes, not its header
    (tmp_path / "damaged.npz").write_bytes(bytes(data))
    with zipfile.ZipFile(tmp_path / "none.npz", "w") as z:
        z.writestr("readme.txt", "no arrays here")
    (tmp_path / "loop.npy").symlink_to("loop.npy")
    (tmp_path / "loop-out").symlink_to(tmp_path / "loop-out")
    out = tmp_path / "out"
    cases = [
        (["--input", str(tmp_path / "empty.npy")], "empty.npy: not a readable .npy file: it does not start with"),
        (["--input", str(tmp_path / "damaged.npz")], "damaged.npz: not a readable .npz file: Error -3"),
        (["--input", str(tmp_path / "none.npz")], "none.npz holds no arrays"),
        (["--input", str(tmp_path / "loop.npy")], "loop.npy: cannot follow its symlinks"),
        (["--prior", "10", "--output", str(tmp_path / "loop-out")], "--output " + str(tmp_path / "loop-out")),
    ]
    for flags, message in cases:
        code = main(["decode-batch", "--output", str(out), *flags, "--models-dir", str(tiny_repo)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (flags, err)
    assert not out.exists()


def test_the_cli_refuses_bad_input_before_anything_runs(tiny_repo: Path, tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "z.npy", np.zeros((10, 4), np.float32))
    np.save(tmp_path / "nan.npy", np.full((10, 8), np.nan, np.float32))
    out = tmp_path / "out"
    cases = [
        (["--input", str(tmp_path / "z.npy"), "--model", "vae8"], "N x 8 latents, got rows of 4"),
        (["--input", str(tmp_path / "nan.npy"), "--model", "vae8"], "row 0 holds NaN"),
        (["--prior", "10", "--model", "gan"], "unknown model 'gan'"),
        (["--prior", "10", "--model", "vae", "--version", "7"], "has no version 7"),
        (["--grid=-1:1:3,-1:1:3", "--model", "vae"], "4 latent dimensions"),
        (["--grid=-1:1"], "expected LO:HI:STEPS"),
        (["--grid=-1e39:1:3"], "LO and HI must lie in [-10000, 10000]"),  # -inf once float32
        (["--traverse", "nan:1:3"], "LO and HI must lie in"),
        (["--prior", "10", "--scale", "nan"], "--scale must be positive and finite"),
        (["--prior", "10", "--grid=-1:1:3"], "takes one input, given --grid and --prior"),
    ]
    for flags, message in cases:
        code = main(["decode-batch", *flags, "--models-dir", str(tiny_repo), "--output", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (flags, err)
        assert not out.exists()  # refused before the job started: nothing written


def test_an_output_folder_of_another_job_is_refused_unless_overwritten(tiny_repo: Path, tmp_path: Path) -> None:
    ref = resolve(str(tiny_repo), "vae", None)
    out = tmp_path / "out"

    def job(seed: int) -> Job:
        return Job("decode", ref, sources.Prior(100, seed, ref.latent_dim), Sink(out, "npz"), shard_size=40)

    first = job(0)
    plan = prepare(first)
    assert plan.todo == [0, 1, 2] and json.loads((out / JOB_FILE).read_text())["job"]["input"]["seed"] == 0
    model = Loaded(ref)
    run_shard(first, model, 0)
    with pytest.raises(UserError, match="holds another job .*differs in input"):
        prepare(job(1))
    replaced = prepare(job(1), overwrite=True)
    assert replaced.todo == [0, 1, 2] and not (out / "part-000000.npz").exists()


def test_a_command_differing_in_format_does_not_delete_another_jobs_shards(tiny_repo: Path, tmp_path: Path) -> None:
    """Another job's shards in another format are none of this sink's parts, yet replacing that job deletes
    them: they protect it as shards of its own format do, and --overwrite removes shards, not any part-* file."""
    ref = resolve(str(tiny_repo), "vae", None)
    out = tmp_path / "out"

    def job(fmt: str) -> Job:
        return Job("decode", ref, sources.Prior(100, 0, ref.latent_dim), Sink(out, fmt), shard_size=40)

    npz = job("npz")
    prepare(npz)
    model = Loaded(ref)
    for shard in range(3):
        run_shard(npz, model, shard)
    (out / "part-notes.txt").write_text("not a shard")
    for fmt in ("parquet", "png"):
        with pytest.raises(UserError, match="holds another job .*differs in format.* with 3 shards on disk"):
            prepare(job(fmt))
        assert sorted(p.name for p in out.glob("part-*.npz")) == [f"part-00000{i}.npz" for i in range(3)]
    (out / JOB_FILE).unlink()
    with pytest.raises(UserError, match="holds 3 part files of an unknown job"):
        prepare(job("parquet"))
    assert prepare(job("parquet"), overwrite=True).todo == [0, 1, 2]
    assert sorted(p.name for p in out.iterdir()) == [JOB_FILE, "part-notes.txt"]


def test_a_job_decodes_in_the_precision_asked_records_it_and_refuses_a_version_without_its_graph(
        tiny_repo: Path, tmp_path: Path) -> None:
    from aevae.store import ModelStore

    ref = resolve(str(tiny_repo), "vae", None, "int8")
    assert ref.precision == "int8" and ref.describe()["precision"] == "int8"
    assert "precision" not in resolve(str(tiny_repo), "vae", None).describe()  # fp32 jobs: named as before
    out = tmp_path / "out"
    source = sources.Prior(300, 0, ref.latent_dim)
    job = Job("decode", ref, source, Sink(out, "npz", meta={"op": "decode", "model": ref.describe()}), shard_size=300)
    prepare(job)
    run_shard(job, Loaded(ref), 0)
    part = np.load(out / "part-000000.npz")
    z = source.read(0, 300)["latent"]
    int8 = ModelStore(tiny_repo, precision="int8").get("vae").decode(z, dtype="uint8")
    fp32 = ModelStore(tiny_repo).get("vae").decode(z, dtype="uint8")
    np.testing.assert_array_equal(part["images"], int8)  # the int8 graph ran, not the fp32 one
    assert (part["images"] != fp32).any()
    assert json.loads((out / JOB_FILE).read_text())["job"]["model"]["precision"] == "int8"
    fp32_job = Job("decode", resolve(str(tiny_repo), "vae", None), source, Sink(out, "npz"), shard_size=300)
    with pytest.raises(UserError, match="holds another job .*differs in model"):
        prepare(fp32_job)  # images of another precision are not mixed into this output

    folder = tiny_repo / "ae" / "1"  # a version written before the int8 graphs
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]["decoder.int8.onnx"]
    (folder / "decoder.int8.onnx").unlink()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="cannot decode in int8 .*aevae export-onnx.*--precision fp32"):
        resolve(str(tiny_repo), "ae", None, "int8")


# -- shards -----------------------------------------------------------------------------------------------------

def test_a_shard_with_a_latent_out_of_range_fails_with_its_rows_and_keeps_the_others(tiny_repo: Path,
                                                                                    tmp_path: Path) -> None:
    """A file can hold latents the up-front scan passes (finite) but the services refuse (beyond LATENT_BOUND):
    the shard holding one fails with a message naming it, in-process and through the Ray Data worker."""
    from aevae.batch.worker import ShardWorker

    z = np.zeros((100, 4), np.float32)
    z[70, 1] = 1e5
    np.save(tmp_path / "big.npy", z)
    ref = resolve(str(tiny_repo), "vae", None)
    job = Job("decode", ref, sources.ArrayFile(tmp_path / "big.npy"), Sink(tmp_path / "out", "npz"), shard_size=40)
    prepare(job)
    model = Loaded(ref)
    assert run_shard(job, model, 0)["rows"] == 40
    with pytest.raises(UserError, match=r"shard 1 \(rows 40 to 79\): latent: values must lie in \[-10000, 10000\]; "
                                        r"row 30 holds \[0.0, 100000.0, 0.0, 0.0\]"):
        run_shard(job, model, 1)
    assert not (tmp_path / "out" / "part-000001.npz").exists()
    import ray

    worker = ShardWorker(job)
    assert worker.node == "" and not ray.is_initialized()  # asking for its node used to start a Ray right here
    assert "shard 1 (rows 40 to 79)" in str(worker({"shard": np.array([1])})["error"][0])
    assert worker({"shard": np.array([2])})["rows"].tolist() == [20]



def test_shards_resume_and_keep_the_input_order(tiny_repo: Path, tmp_path: Path) -> None:
    ref = resolve(str(tiny_repo), "vae8", None)  # 8-d latents, 24 x 20 images
    assert (ref.latent_dim, ref.image_shape) == (8, (24, 20))
    source = sources.Prior(1000, 0, 8)
    out = tmp_path / "out"
    job = Job("decode", ref, source, Sink(out, "parquet", "png", {"op": "decode"}), shard_size=300)
    model = Loaded(ref)
    plan = prepare(job)
    assert plan.todo == [0, 1, 2, 3]
    for shard in (0, 2):
        assert run_shard(job, model, shard)["rows"] == 300
    (out / ".part-000001.parquet.tmp-123").write_bytes(b"half a file")  # a writer killed mid-shard
    import os

    from aevae.repository import STALE_SECONDS

    dead_tmp = out / f".{JOB_FILE}.tmp-123"  # a run killed replacing the job file, an hour ago and more
    dead_tmp.write_text("{")
    old = dead_tmp.stat().st_mtime - STALE_SECONDS - 60
    os.utime(dead_tmp, (old, old))
    live_tmp = out / f".{JOB_FILE}.tmp-456"  # a run writing it now
    live_tmp.write_text("{")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    plan = prepare(job)
    assert plan.todo == [1, 3] and plan.skipped_rows == 600 and not list(out.glob(".part-*"))
    assert not dead_tmp.exists() and live_tmp.exists()
    live_tmp.unlink()
    for shard in plan.todo:
        run_shard(job, model, shard)
    assert {p: out.joinpath(p).stat().st_mtime_ns for p in before} == before  # done shards untouched
    table = read_parquet(out)
    np.testing.assert_array_equal(table.column("id").to_numpy(), np.arange(1000))
    z = np.stack(table.column("latent").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(z, source.read(0, 1000)["latent"])
    images = png.decode_many(table.column("image").to_pylist())
    assert images.shape == (1000, 24, 20)
    np.testing.assert_array_equal(images, model.decode(z))
    assert prepare(job).todo == []


def test_a_damaged_png_shard_is_made_again_whole(tiny_repo: Path, tmp_path: Path) -> None:
    """A PNG shard is a folder, and rename() cannot replace a folder that holds files: the shard made again must
    still take the damaged one's place, not be thrown away while the job counts it written."""
    ref = resolve(str(tiny_repo), "vae", None)
    out = tmp_path / "out"
    job = Job("decode", ref, sources.Prior(100, 0, ref.latent_dim), Sink(out, "png", id_digits=6), shard_size=50)
    model = Loaded(ref)
    for shard in prepare(job).todo:
        run_shard(job, model, shard)
    whole = sorted(p.name for p in (out / "part-000001").iterdir())
    assert len(whole) == 51  # 50 images and the input digest
    for name in whole[:10]:
        (out / "part-000001" / name).unlink()
    plan = prepare(job)
    assert plan.todo == [1]
    run_shard(job, model, 1)
    assert sorted(p.name for p in (out / "part-000001").iterdir()) == whole
    assert prepare(job).todo == [] and not list(out.glob(".part-*"))  # the old folder is gone too


def _finished_job(tiny_repo: Path, out: Path, fmt: str, rows: int) -> tuple[Job, Loaded]:
    """A decode job of `rows` prior latents in shards of 100, every shard written; with its model."""
    ref = resolve(str(tiny_repo), "vae", None)
    job = Job("decode", ref, sources.Prior(rows, 0, ref.latent_dim), Sink(out, fmt, id_digits=6), shard_size=100)
    model = Loaded(ref)
    for shard in prepare(job).todo:
        run_shard(job, model, shard)
    return job, model


@pytest.mark.parametrize("fmt", ["parquet", "npz", "png"])
def test_verify_makes_again_a_shard_damaged_inside_a_whole_file(tiny_repo: Path, tmp_path: Path, fmt: str) -> None:
    """One byte flipped inside a finished shard, its index (Parquet footer, zip directory, file count) left
    whole: a plain rerun keeps it as done (it reads no shard's data); `--verify` reads every shard, removes the
    damaged one and makes it again, keeping the others untouched."""
    job, model = _finished_job(tiny_repo, tmp_path / "out", fmt, 300)
    out = tmp_path / "out"
    target = out / "part-000001" / "000150.png" if fmt == "png" else job.sink.path(1)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x40  # Parquet: inside the images' page, whose data its CRC covers
    target.write_bytes(bytes(data))
    others = {shard: job.sink.path(shard).stat().st_mtime_ns for shard in (0, 2)}
    assert job.sink.done(1, 100) and prepare(job).todo == []  # its index is whole: kept without --verify
    assert not job.sink.intact(1, 100, 200) and job.sink.intact(0, 0, 100) and job.sink.intact(2, 200, 300)
    notes: list[str] = []
    plan = prepare(job, note=notes.append, verify=True)
    assert plan.todo == [1] and plan.damaged == 1 and plan.skipped_shards == 2 and not job.sink.path(1).exists()
    assert notes == ["--verify: reading the 3 shards on disk whole"]
    run_shard(job, model, 1)
    assert job.sink.intact(1, 100, 200) and prepare(job, verify=True).todo == []
    assert {shard: job.sink.path(shard).stat().st_mtime_ns for shard in (0, 2)} == others
    # another shard's file (or folder) copied over shard 1: whole, with the right count of rows, but not its rows
    import shutil

    shutil.rmtree(job.sink.path(1)) if fmt == "png" else job.sink.path(1).unlink()
    (shutil.copytree if fmt == "png" else shutil.copyfile)(job.sink.path(0), job.sink.path(1))
    assert prepare(job).todo == []  # without --verify: counted done by its index, as documented
    assert prepare(job, verify=True).todo == [1]
    run_shard(job, model, 1)
    assert prepare(job, verify=True).todo == []


@pytest.mark.parametrize("fmt", ["parquet", "npz", "png"])
def test_a_shard_entry_of_the_wrong_kind_or_rows_is_made_again(tiny_repo: Path, tmp_path: Path, fmt: str) -> None:
    """A folder where a file shard belongs (a file where a PNG folder does) failed every rerun ("Is a directory"
    naming a temporary, and advice to free space); an NPZ shard holding another number of rows (the last
    shard's copied over one) counted done, its rows missing from the output."""
    import shutil

    job, model = _finished_job(tiny_repo, tmp_path / "out", fmt, 250)
    path = job.sink.path(1)
    shutil.rmtree(path) if fmt == "png" else path.unlink()
    path.write_text("x") if fmt == "png" else path.mkdir()
    plan = prepare(job)
    assert plan.todo == [1] and not path.exists()
    run_shard(job, model, 1)
    assert prepare(job).todo == [] and job.sink.done(1, 100)
    if fmt == "npz":
        shutil.copyfile(job.sink.path(2), path)  # 50 rows where 100 belong
        assert not job.sink.done(1, 100) and prepare(job).todo == [1]


def test_png_intact_checks_every_chunk_and_the_image_data() -> None:
    blob = png.encode_many(np.arange(64, dtype=np.uint8).reshape(1, 8, 8))[0]
    assert png.intact(blob)
    for broken in (blob[:-1], blob + b"x", b"GIF89a" + blob[6:], blob[:8] + blob[20:]):
        assert not png.intact(broken)
    for at in range(8, len(blob)):  # every single flipped bit past the signature is caught
        flipped = bytearray(blob)
        flipped[at] ^= 1
        assert not png.intact(bytes(flipped)), at


def test_a_job_file_that_cannot_be_written_at_the_end_is_one_line_and_leaves_no_temporary(
        tiny_repo: Path, tmp_path: Path, monkeypatch) -> None:
    """The disk filling with the last shard: every shard is on disk, and finishing says so in a UserError (one
    line from the CLI) instead of an OSError's traceback, leaving no half-written job file beside them."""
    import errno

    from aevae.batch import job as jobs

    ref = resolve(str(tiny_repo), "vae", None)
    out = tmp_path / "out"
    job = Job("decode", ref, sources.Prior(100, 0, ref.latent_dim), Sink(out, "npz"), shard_size=50)
    plan = prepare(job)
    before = (out / JOB_FILE).read_text()

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jobs.os, "replace", full)
    with pytest.raises(UserError, match=r"all 2 shards are on disk and kept, but .*_aevae_batch.json could not be "
                                        r"updated \(No space left on device\); free some space"):
        jobs.finish(plan, {"rows": 100}, "fleet")
    assert sorted(p.name for p in out.iterdir()) == [JOB_FILE] and (out / JOB_FILE).read_text() == before


def test_encode_shards_carry_latents_logvar_and_labels(tiny_repo: Path, tmp_path: Path, mnist_root: Path) -> None:
    ref = resolve(str(tiny_repo), "vae", None)
    source = sources.MnistImages(str(mnist_root), "test")
    source.rows = 500
    source.check(ref.latent_dim, ref.image_shape)
    job = Job("encode", ref, source, Sink(tmp_path / "enc", "npz"), shard_size=200)
    model = Loaded(ref)
    prepare(job)
    for shard in range(job.shards):
        run_shard(job, model, shard)
    parts = [np.load(p) for p in sorted((tmp_path / "enc").glob("part-*.npz"))]
    ids = np.concatenate([p["ids"] for p in parts])
    np.testing.assert_array_equal(ids, np.arange(500))
    mean, logvar = model.encode(source.read(0, 500)["image"])
    np.testing.assert_allclose(np.concatenate([p["latents"] for p in parts]), mean, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([p["logvar"] for p in parts]), logvar, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([p["labels"] for p in parts]), source.read(0, 500)["label"])


# -- resuming after the input file was fixed --------------------------------------------------------------------

def test_a_fixed_input_file_resumes_and_makes_again_only_the_shards_whose_rows_changed(tiny_repo: Path,
                                                                                       tmp_path: Path) -> None:
    """A bad row stops the job at its shard; the file fixed in place (new modification time, same size) is the
    same job: the shards on disk whose rows are unchanged are kept untouched, one whose rows changed too is
    made again, and nothing needs --overwrite."""
    rng = np.random.default_rng(5)
    z = rng.normal(size=(200, 4)).astype(np.float32)
    z[130, 2] = 1e5  # shard 3 of 40 rows: beyond the services' bound, found only when the shard runs
    path = tmp_path / "z.npy"
    np.save(path, z)
    ref = resolve(str(tiny_repo), "vae", None)
    out = tmp_path / "out"

    def job() -> Job:  # what each run of the same command builds afresh
        return Job("decode", ref, sources.ArrayFile(path), Sink(out, "parquet"), shard_size=40)

    model = Loaded(ref)
    first = job()
    assert prepare(first).todo == [0, 1, 2, 3, 4]
    for shard in range(3):
        run_shard(first, model, shard)
    with pytest.raises(UserError, match=r"shard 3 \(rows 120 to 159\)"):
        run_shard(first, model, 3)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    assert len(kept) == 3

    z[130, 2] = 0.5  # the bad row fixed ...
    z[45, 0] += 1.0  # ... and one row of the finished shard 1 changed as well
    np.save(path, z)
    notes: list[str] = []
    plan = prepare(job(), note=notes.append)  # refused before the fix: "holds another job (it differs in input)"
    assert plan.todo == [1, 3, 4] and plan.skipped_shards == 2 and plan.redone == 1
    assert notes and "the input changed since the last run" in notes[0]
    assert not (out / "part-000001.parquet").exists()  # removed before the job file records the new input
    again = job()
    for shard in plan.todo:
        run_shard(again, model, shard)
    assert {n: (out / n).stat().st_mtime_ns for n in ("part-000000.parquet", "part-000002.parquet")} == \
        {n: kept[n] for n in ("part-000000.parquet", "part-000002.parquet")}  # untouched
    table = read_parquet(out)
    np.testing.assert_array_equal(np.stack(table.column("latent").to_numpy(zero_copy_only=False)), z)
    assert prepare(job()).todo == []  # unchanged since: nothing to check, nothing to do


def test_a_finished_shard_that_records_no_input_digest_is_not_trusted_after_the_input_changed(
        tiny_repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "z.npy"
    np.save(path, np.zeros((80, 4), np.float32))
    ref = resolve(str(tiny_repo), "vae", None)
    job = Job("decode", ref, sources.ArrayFile(path), Sink(tmp_path / "out", "npz"), shard_size=40)
    prepare(job)
    run_shard(job, Loaded(ref), 0)
    with np.load(job.sink.path(0)) as data:  # rewritten as an older writer did: no digest
        np.savez(job.sink.path(0), **{k: data[k] for k in data.files if k != "input_digest"})
    assert job.sink.done(0, 40) and job.sink.digest(0) is None
    assert prepare(job).todo == [1]  # the input is unchanged: the shard on disk stands
    np.save(path, np.zeros((80, 4), np.float32))  # the same rows, a new modification time
    assert prepare(job).todo == [0, 1]  # cannot be shown to match: made again


@pytest.mark.parametrize("fmt, image_format", [("parquet", "raw"), ("npz", "raw"), ("png", "raw")])
def test_every_format_carries_the_digest_of_its_input_rows(tiny_repo: Path, tmp_path: Path, fmt: str,
                                                           image_format: str) -> None:
    from aevae.batch.job import input_digest

    ref = resolve(str(tiny_repo), "vae", None)
    source = sources.Prior(50, 2, ref.latent_dim)
    job = Job("decode", ref, source, Sink(tmp_path / "out", fmt, image_format), shard_size=30)
    prepare(job)
    run_shard(job, Loaded(ref), 1)
    assert job.sink.done(1, 20) and not job.sink.done(0, 30)
    assert job.sink.digest(1) == input_digest(source.read(30, 50)) != input_digest(source.read(0, 30))
    assert job.sink.digest(0) is None


def test_a_job_file_without_shards_protects_nothing_and_is_replaced(tiny_repo: Path, tmp_path: Path) -> None:
    """A job that failed before its first shard leaves only its job file: a corrected command (another input,
    another shard size) starts there without --overwrite. With shards on disk the folder is still refused."""
    ref = resolve(str(tiny_repo), "vae", None)
    out = tmp_path / "out"

    def job(seed: int, shard_size: int) -> Job:
        return Job("decode", ref, sources.Prior(100, seed, ref.latent_dim), Sink(out, "parquet"),
                   shard_size=shard_size)

    prepare(job(0, 40))
    plan = prepare(job(1, 50))
    assert plan.todo == [0, 1] and json.loads((out / JOB_FILE).read_text())["job"]["shard_size"] == 50
    run_shard(job(1, 50), Loaded(ref), 0)
    with pytest.raises(UserError, match=r"holds another job \(it differs in input\) with 1 shards on disk"):
        prepare(job(2, 50))
    assert (out / "part-000000.parquet").exists()


# -- flags and sizes refused before the job starts --------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--prior", "10", "--seed", "-1"], "--seed must be a whole number from 0 up, got -1"),
    (["--prior", "10", "--scale", "1e300"], "--scale must be positive and at most 1000"),
    (["--prior", "10", "--scale", "1e-50"], "--scale must be positive and at most 1000"),  # 0 as float32
    (["--traverse=-1:1:3", "--prior", "2", "--seed", "-5"], "--seed must be a whole number from 0 up"),
    (["--prior", "10", "--cpus-per-worker", "1e300"], "needs 1e+300 CPUs"),
    (["--prior", "10", "--cpus-per-worker", "0.00001"], "--cpus-per-worker must be at least 0.0001"),
    (["--prior", "10", "--workers", "100000"], "--workers 100000 x --cpus-per-worker 1 needs 100000 CPUs"),
    (["--grid=-3:3:1000"], "make 15,258,790 shards of 65,536, and a job holds at most 100,000 shards"),
    (["--prior", "100000000000000"], "a job of 32x32 images holds at most 209,715,200,000 rows"),
    (["--prior", "10000000000", "--shard-size", "1000"], "pass --shard-size 100,000 or more"),
    (["--prior", "10", "--shard-size", "100000000"], "at most 2,147,483,648 pixels (2,097,152 images of 32x32)"),
    (["--prior", "10", "--seed", "-1", "--decoder", "127.0.0.1:9"], "--seed must be a whole number"),  # no fleet asked
])
def test_bad_numbers_and_absurd_sizes_are_refused_at_once_in_one_line(tiny_repo: Path, tmp_path: Path, capsys,
                                                                      flags: list[str], message: str) -> None:
    import time

    out = tmp_path / "out"
    models = [] if "--decoder" in flags else ["--models-dir", str(tiny_repo)]
    started = time.monotonic()
    code = main(["decode-batch", *flags, *models, "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert time.monotonic() - started < 10  # no setup over every shard of a huge job
    assert not out.exists()  # refused before anything was written (and before Ray started)


def test_a_grid_counts_its_rows_without_wrapping_around() -> None:
    assert sources.Grid([(-1.0, 1.0, 100_000)] * 8).rows == 10 ** 40  # numpy's int64 product would wrap


def test_the_size_limits_are_inclusive() -> None:
    from aevae.batch.job import MAX_SHARD_PIXELS, MAX_SHARDS, check_size

    check_size(MAX_SHARDS * 10, 10, (32, 32))
    with pytest.raises(UserError, match="at most 100,000 shards"):
        check_size(MAX_SHARDS * 10 + 1, 10, (32, 32))
    check_size(5, MAX_SHARD_PIXELS // 1024, (32, 32))
    with pytest.raises(UserError, match="a worker holds one shard in memory"):
        check_size(5, MAX_SHARD_PIXELS // 1024 + 1, (32, 32))


def test_finding_the_finished_shards_lists_the_folder_once(tiny_repo: Path, tmp_path: Path, monkeypatch) -> None:
    """Setup costs what is on disk, not a probe per shard: a job of the most shards starts at once."""
    from aevae.batch.job import MAX_SHARDS

    ref = resolve(str(tiny_repo), "vae", None)
    job = Job("decode", ref, sources.Prior(MAX_SHARDS, 0, ref.latent_dim), Sink(tmp_path / "out", "parquet"),
              shard_size=1)
    probed: list[int] = []
    real = Sink.done
    monkeypatch.setattr(Sink, "done", lambda self, shard, rows: probed.append(shard) or real(self, shard, rows))
    plan = prepare(job)
    assert len(plan.todo) == MAX_SHARDS and probed == []
    run_shard(job, Loaded(ref), 7)
    assert prepare(job).skipped_shards == 1 and probed == [7]


@pytest.mark.parametrize("where", ["under-a-file", "sysfs"])
def test_an_output_that_cannot_be_written_is_one_line_naming_it(tiny_repo: Path, tmp_path: Path, capsys,
                                                                where: str) -> None:
    if where == "under-a-file":
        (tmp_path / "somefile").write_text("x")
        out, reason = tmp_path / "somefile" / "sub", "a part of the path is a file"
    else:
        out, reason = Path("/sys/aevae-batch-test-out"), "cannot create or write it"
        try:
            os.mkdir(out)
        except OSError:
            pass  # as expected: sysfs takes no folders
        else:
            os.rmdir(out)
            pytest.skip("/sys takes folders here")
    code = main(["decode-batch", "--prior", "10", "--models-dir", str(tiny_repo), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"--output {out}: " in err and reason in err and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_without_an_address_the_ray_engine_starts_its_own_ray(tiny_repo: Path, tmp_path: Path,
                                                               monkeypatch) -> None:
    """Given address=None, ray.init joins a cluster that `ray start` left on this machine (its other nodes may
    not see the output, Ctrl-C does not stop it): without --address or RAY_ADDRESS the job asks for a local Ray."""
    import ray

    from aevae.batch.job import run_ray
    from aevae.batch.progress import Progress

    asked: list[str | None] = []

    class Stop(Exception):
        pass

    def init(address=None, **kwargs):
        asked.append(address)
        raise Stop

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    ref = resolve(str(tiny_repo), "vae", None)
    job = Job("decode", ref, sources.Prior(10, 0, ref.latent_dim), Sink(tmp_path / "out", "npz"), shard_size=10)
    plan = prepare(job)
    progress = Progress("decode-batch", 10, 1, 0, 0, quiet=True)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for address in (None, "auto"):
        with pytest.raises(Stop):
            run_ray(job, plan, progress, address=address)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(Stop):
        run_ray(job, plan, progress)
    assert asked == ["local", "auto", None]  # RAY_ADDRESS names a cluster: Ray reads it


# -- the fleet engine, with a stand-in client -------------------------------------------------------------------

class StandInClient:
    """What FleetModel and run_fleet use of a (fan-out) client: decode and encode with a deadline, targets,
    stream_chunk, close. `hold` calls wait until the client is closed (as a cancelled gRPC call does), then fail."""

    def __init__(self, model: Loaded, targets: int = 1, stream_chunk: int = 4096, hold: bool = False,
                 error: Exception | None = None):
        import threading

        self.model, self.targets, self.stream_chunk = model, [f"replica{i}:1" for i in range(targets)], stream_chunk
        self.hold, self.error = hold, error
        self.deadlines: list[float | None] = []
        self.closed = threading.Event()
        self.lock = threading.Lock()

    def decode(self, latents, model, version, dtype, timeout=None):
        import grpc

        from aevae.client import AevaeError

        with self.lock:
            self.deadlines.append(timeout)
            first = len(self.deadlines) == 1
        if self.error is not None:
            raise self.error
        if self.hold and not first:  # the first call answers, the others are still running when stopped
            if self.closed.wait(30):
                raise AevaeError(grpc.StatusCode.CANCELLED, "Channel closed!")
        return self.model.decode(latents)

    def close(self) -> None:
        self.closed.set()


def test_the_fleet_deadline_is_per_request_message_whatever_the_shard_size(tiny_repo: Path) -> None:
    """--timeout 1 on a shard of 300,000 rows: 74 messages of 4,096 rows, 74 s for the call (one replica), or
    10 chunks, 10 s, for each span a fan-out client sends to a replica; one message: 1 s."""
    from aevae.batch.job import FleetModel

    ref = resolve(str(tiny_repo), "vae", None)
    one = FleetModel(StandInClient(Loaded(ref)), ref, timeout=1.0)
    assert (one.deadline(300_000), one.deadline(4096), one.deadline(4097), one.deadline(1)) == (74, 1, 2, 1)
    two = FleetModel(StandInClient(Loaded(ref), targets=2), ref, timeout=1.0)
    assert (two.deadline(300_000), two.deadline(4096), two.deadline(10_000)) == (10, 1, 1)  # spans of 4,096
    client = StandInClient(Loaded(ref), targets=2)
    FleetModel(client, ref, timeout=2.5).decode(np.zeros((9000, 4), np.float32))
    assert client.deadlines == [2.5]  # 9,000 rows over two replicas: spans of one chunk each
    assert FleetModel(StandInClient(Loaded(ref)), ref, timeout=None).deadline(10 ** 6) is None


def test_a_missed_deadline_names_the_shard_and_what_to_change(tiny_repo: Path, tmp_path: Path) -> None:
    import grpc

    from aevae.batch.job import FleetModel
    from aevae.client import AevaeError

    ref = resolve(str(tiny_repo), "vae", None)
    job = Job("decode", ref, sources.Prior(100, 0, 4), Sink(tmp_path / "out", "parquet"), shard_size=40)
    prepare(job)
    for error in (AevaeError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),  # one replica
                  AevaeError(grpc.StatusCode.UNAVAILABLE, "all 2 replicas failed with 3 spans left (a:1: Deadline "
                             "Exceeded; b:1: Deadline Exceeded)")):  # a fan-out that gave up
        model = FleetModel(StandInClient(Loaded(ref), error=error), ref, timeout=0.5)
        with pytest.raises(UserError, match=r"^shard 1 \(rows 40 to 79\): no answer within the deadline "
                                            r"\(--timeout 0.5 s per request message.*Pass a bigger --timeout"):
            run_shard(job, model, 1)
    other = AevaeError(grpc.StatusCode.NOT_FOUND, "no model")
    with pytest.raises(AevaeError):
        run_shard(job, FleetModel(StandInClient(Loaded(ref), error=other), ref, timeout=0.5), 1)


def test_a_stopped_fleet_job_cancels_the_shards_in_flight_before_it_returns(tiny_repo: Path, tmp_path: Path) -> None:
    """Ctrl-C while shards run: run_fleet cancels the calls in flight and returns once every shard thread has
    ended, so the shards counted on disk then are all there will be (it used to count only those reported,
    while the others went on and landed after the message)."""
    import time

    from aevae.batch.job import on_disk, run_fleet
    from aevae.batch.progress import Progress

    ref = resolve(str(tiny_repo), "vae", None)
    job = Job("decode", ref, sources.Prior(400, 0, 4), Sink(tmp_path / "out", "parquet"), shard_size=40)
    plan = prepare(job)
    client = StandInClient(Loaded(ref), hold=True)
    progress = Progress("test", job.rows, job.shards, 0, 0, quiet=True)

    def interrupt(stats: dict) -> None:
        raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_fleet(job, plan, progress, client, concurrency=3, on_shard=interrupt, timeout=60)
    assert time.monotonic() - started < 20  # not the held calls' 30 s
    assert client.closed.is_set()
    assert on_disk(job) == len(list(job.sink.root.glob("part-*"))) == 1 == progress.shards
    time.sleep(0.3)
    assert len(list(job.sink.root.glob("part-*"))) == 1  # nothing lands afterwards
