"""aevae decode-batch / encode-batch on Ray Data, on a two-node cluster simulated in this process
(ray.cluster_utils.Cluster: two raylets of one CPU each, so the actor pool spans both nodes).

One cluster for the module; each job is small (a few thousand rows in shards of a few hundred)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import pytest

from aevae.batch import sources
from aevae.batch.job import Job, prepare, run_ray
from aevae.batch.model import Loaded, resolve
from aevae.batch.progress import Progress
from aevae.batch.sinks import Sink
from aevae.cli import main
from helpers import write_tiny

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batch") / "models"
    write_tiny(root, "vae", "vae")
    write_tiny(root, "vae8", "vae", latent_dim=8, image_shape=(24, 20))  # nothing here assumes 4-d or 32 x 32
    return root


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def decode_job(repo: Path, out: Path, rows: int = 3000, shard_size: int = 400, model: str = "vae8") -> Job:
    ref = resolve(str(repo), model, None)
    return Job("decode", ref, sources.Prior(rows, 7, ref.latent_dim), Sink(out, "parquet", "raw"),
               shard_size=shard_size)


def run(job: Job, **kwargs) -> tuple[Progress, list[dict]]:
    plan = prepare(job)
    progress = Progress("test", job.rows, job.shards, plan.skipped_rows, plan.skipped_shards, quiet=True)
    seen: list[dict] = []
    on_shard = kwargs.pop("on_shard", None)

    def record(stats: dict) -> None:
        seen.append(stats)
        if on_shard:
            on_shard(stats)

    run_ray(job, plan, progress, on_shard=record, **kwargs)
    return progress, seen


def check_output(job: Job) -> None:
    """Every row exactly once, in input order, each image what the model makes of its latent."""
    table = pq.read_table(job.sink.root)
    ids = table.column("id").to_numpy()
    np.testing.assert_array_equal(ids, np.arange(job.rows))  # no row lost, none twice, in order
    z = np.stack(table.column("latent").to_numpy(zero_copy_only=False))
    expected_z = job.source.read(0, job.rows)["latent"]
    np.testing.assert_array_equal(z, expected_z)
    h, w = job.model.image_shape
    raw = table.column("image").combine_chunks()
    images = np.frombuffer(raw.buffers()[1], np.uint8, count=len(raw) * h * w).reshape(-1, h, w)
    expected = Loaded(job.model).decode(expected_z)
    diff = np.abs(images.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # torch thread counts may round a pixel differently


def test_decode_batch_runs_on_both_nodes_of_a_cluster(cluster, repo: Path, tmp_path: Path) -> None:
    job = decode_job(repo, tmp_path / "out")
    progress, seen = run(job, workers=2)
    assert sorted(s["shard"] for s in seen) == list(range(job.shards))
    # The job ran on this two-node cluster (which node an actor's shards went to depends on how fast each
    # actor started, so only membership is asserted).
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2 and {s["node"] for s in seen} <= nodes
    assert progress.summary()["rows"] == 3000
    check_output(job)


def test_a_killed_actor_loses_and_duplicates_no_row(cluster, repo: Path, tmp_path: Path) -> None:
    job = decode_job(repo, tmp_path / "out")
    marker = tmp_path / "killed"
    job.fault = {"shard": 2, "marker": str(marker)}  # the actor dies after writing shard 2, before reporting it
    progress, seen = run(job, workers=2)
    assert marker.exists()  # an actor process really was killed
    assert sorted(s["shard"] for s in seen) == list(range(job.shards))  # shard 2 ran again, reported once
    check_output(job)


def test_a_rerun_after_an_interruption_resumes(cluster, repo: Path, tmp_path: Path) -> None:
    job = decode_job(repo, tmp_path / "out", shard_size=250)

    def interrupt(stats: dict) -> None:
        raise KeyboardInterrupt  # Ctrl-C once the first shard is reported

    with pytest.raises(KeyboardInterrupt):
        run(job, workers=2, on_shard=interrupt)
    done = {p.name: p.stat().st_mtime_ns for p in job.sink.root.glob("part-*.parquet")}
    assert 1 <= len(done) < job.shards
    progress, seen = run(job, workers=2)
    assert progress.skipped_shards == len(done)
    assert sorted(s["shard"] for s in seen) == sorted(set(range(job.shards)) - {int(n[5:11]) for n in done})
    assert {n: job.sink.root.joinpath(n).stat().st_mtime_ns for n in done} == done  # not rewritten
    check_output(job)


def test_the_cli_decodes_and_encodes_on_the_running_cluster(cluster, repo: Path, tmp_path: Path, mnist_root: Path,
                                                            capsys) -> None:
    out = tmp_path / "grid"
    code = main(["decode-batch", "--grid=-2:2:6", "--model", "vae", "--models-dir", str(repo), "--output", str(out),
                 "--format", "npz", "--shard-size", "500"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "decode-batch: wrote 1,296 rows" in err and "items/s" in err
    parts = [np.load(p) for p in sorted(out.glob("part-*.npz"))]
    assert len(parts) == 3
    np.testing.assert_array_equal(np.concatenate([p["ids"] for p in parts]), np.arange(6 ** 4))
    np.testing.assert_array_equal(np.concatenate([p["latents"] for p in parts]),
                                  sources.Grid([(-2.0, 2.0, 6)] * 4).read(0, 6 ** 4)["latent"])
    assert np.concatenate([p["images"] for p in parts]).shape == (1296, 32, 32)
    # the decoded images back through the encoder, straight from the Parquet of a second job
    pq_out = tmp_path / "grid-parquet"
    assert main(["decode-batch", "--grid=-2:2:6", "--model", "vae", "--models-dir", str(repo), "--output",
                 str(pq_out), "--image-format", "png", "--quiet"]) == 0
    enc = tmp_path / "encoded"
    assert main(["encode-batch", "--input", str(pq_out), "--model", "vae", "--models-dir", str(repo),
                 "--output", str(enc), "--quiet"]) == 0
    table = pq.read_table(enc)
    assert table.column_names == ["id", "latent", "logvar"] and table.num_rows == 1296
    mnist = tmp_path / "mnist"
    assert main(["encode-batch", "--mnist", "test", "--data-root", str(mnist_root), "--limit", "700", "--model",
                 "vae", "--models-dir", str(repo), "--output", str(mnist), "--shard-size", "300", "--quiet"]) == 0
    table = pq.read_table(mnist)
    assert table.column_names == ["id", "latent", "logvar", "label"]
    np.testing.assert_array_equal(table.column("id").to_numpy(), np.arange(700))
    (mnist / "part-000001.parquet").unlink()  # as if the first run had stopped before this shard
    capsys.readouterr()
    assert main(["encode-batch", "--mnist", "test", "--data-root", str(mnist_root), "--limit", "700", "--model",
                 "vae", "--models-dir", str(repo), "--output", str(mnist), "--shard-size", "300"]) == 0
    assert "2 shards done before" in capsys.readouterr().err
    assert pq.read_table(mnist).num_rows == 700
