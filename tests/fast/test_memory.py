"""Memory checks: what aevae.memory reads from fake /proc and cgroup trees, `aevae train` refusing models its
workers could not hold, and a service refusing (for now, not for ever) a version too big to load."""

from __future__ import annotations

from pathlib import Path

import pytest

from aevae import cli, memory
from aevae.errors import ResourceExhausted
from helpers import without_mnist_or_ray, write_tiny

GIB = memory.GIB


def _tree(tmp_path: Path, cgroup: str, files: dict[str, str], available_kb: int = 8 << 20) -> dict[str, str]:
    (tmp_path / "fs").mkdir(parents=True)
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    (tmp_path / "cgroup").write_text(cgroup)
    (tmp_path / "meminfo").write_text(f"MemTotal: 16000000 kB\nMemFree: 100 kB\nMemAvailable: {available_kb} kB\n")
    return {"proc_cgroup": str(tmp_path / "cgroup"), "cgroup_root": str(tmp_path / "fs"),
            "meminfo": str(tmp_path / "meminfo")}


def test_without_a_limit_the_kernels_estimate_counts(tmp_path: Path) -> None:
    paths = _tree(tmp_path, "0::/a\n", {"a/memory.max": "max\n", "a/memory.current": "123\n"})
    assert memory.available_bytes(**paths) == 8 * GIB


def test_a_cgroup_v2_limit_of_an_ancestor_caps_it(tmp_path: Path) -> None:
    """A pod's limit sits on the pod's cgroup, the container's says "max": the room left under the pod's."""
    files = {"pod/memory.max": str(2 * GIB), "pod/memory.current": str(GIB // 2),
             "pod/app/memory.max": "max", "pod/app/memory.current": str(GIB // 4)}
    assert memory.available_bytes(**_tree(tmp_path, "0::/pod/app\n", files)) == 3 * GIB // 2


def test_cgroup_v1_seen_as_the_mounts_root_and_its_no_limit_value(tmp_path: Path) -> None:
    files = {"memory/memory.limit_in_bytes": str(GIB), "memory/memory.usage_in_bytes": str(GIB + 5)}
    assert memory.available_bytes(**_tree(tmp_path / "a", "4:memory:/docker/abc\n", files)) == 0  # over: none
    unlimited = {"memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": "1"}
    assert memory.available_bytes(**_tree(tmp_path / "b", "4:memory:/x\n", unlimited)) == 8 * GIB


def test_nothing_known_refuses_nothing(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    assert memory.available_bytes(missing, missing, missing) is None
    assert memory.shortfall(10**18, 10**19) is None
    assert memory.shortfall(3 * GIB, 2 * GIB) == "3.0 GiB, and 2.0 GiB is available"


def test_train_refuses_models_its_worker_could_not_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """--hidden 60000,60000 asked for hundreds of GiB and ended in the out-of-memory killer; it is refused
    before MNIST is read or Ray starts (neither runs here: the error comes first), naming the numbers."""
    from aevae.trainer import job

    monkeypatch.setattr(memory, "available_bytes", lambda: 4 * GIB)
    without_mnist_or_ray(monkeypatch)
    monkeypatch.setattr(job, "_fit", lambda *args: pytest.fail("trained"))
    code = cli.main(["train", "--hidden", "20000,1000", "--num-workers", "2", "--cpus-per-worker", "1",
                     "--models-dir", str(tmp_path / "m"), "--storage-path", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    parameters = sum(sum(arch.parameters()) for arch in (
        job.Architecture(kind=kind, hidden=(20000, 1000)) for kind in ("ae", "vae")))
    assert (f"the models of --hidden 20000,1000 --latent-dim 4 have {parameters:,} parameters, and training them "
            f"needs at least {2 * 20 * parameters / GIB:,.1f} GiB, and 4.0 GiB is available (2 workers, each "
            "holding") in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "r").exists()
    assert job.training_bytes(1000, "fp32") == 16 * 1000 and job.training_bytes(1000, "bf16") == 20 * 1000


def test_a_train_limit_past_the_images_there_are_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from aevae.trainer import job

    without_mnist_or_ray(monkeypatch)  # 300 images
    seen: list[int] = []

    def stop(config: object, archs: object, repository: object, data: object, train: job.mnist.Split,
             *args: object) -> None:
        seen.append(len(train.images))

    monkeypatch.setattr(job, "_train_and_write", stop)
    assert cli.main(["train", "--train-limit", "100000", "--hidden", "16", "--models-dir", str(tmp_path / "m"),
                     "--storage-path", str(tmp_path / "r")]) == 0
    assert "--train-limit 100,000 is more than the 300 training images there are: training on all of them" in \
        capsys.readouterr().err
    assert seen == [300]


def test_a_version_too_big_for_the_memory_left_is_refused_for_now_not_marked_broken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder in a 2 GiB container loading a version of 8192-wide layers was killed by the kernel. The load is
    refused before anything is read, as RESOURCE_EXHAUSTED naming the sizes; the version is listed (not
    loaded), not marked broken, and loads once the memory is there."""
    from aevae.store import ModelStore

    version = write_tiny(tmp_path, "vae", "vae", hidden=(64,))
    graphs = sum(version.file(name).stat().st_size for name in ("encoder.onnx", "decoder.onnx"))
    room = {"bytes": 3 * graphs - 1}
    monkeypatch.setattr(memory, "available_bytes", lambda: room["bytes"])
    store = ModelStore(tmp_path, runtime="onnx")
    with pytest.raises(ResourceExhausted) as refused:
        store.get("vae")
    assert "model 'vae' version 1 cannot be loaded now: loading its encoder.onnx and decoder.onnx" in str(refused.value)
    assert "is available; it is tried again on the next request" in str(refused.value)
    store.preload()  # says so, does not raise
    [summary] = store.summaries()
    assert (summary.number, summary.numbers, summary.broken, summary.runtime) == (1, [1], {}, "")
    room["bytes"] = 3 * graphs
    assert store.get("vae").number == 1
    torch_store = ModelStore(tmp_path, runtime="torch")
    room["bytes"] = 3 * version.file("weights.pt").stat().st_size - 1
    with pytest.raises(ResourceExhausted, match="loading its weights.pt"):
        torch_store.get("vae", 1)
