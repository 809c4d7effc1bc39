"""aevae.cpus.available_cpus: the model runtimes' default pool width, read from fake cgroup trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aevae.cpus import available_cpus

AFFINITY = len(os.sched_getaffinity(0))


def _tree(tmp_path: Path, cgroup: str, files: dict[str, str]) -> tuple[str, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "cgroup"
    proc.write_text(cgroup)
    root = tmp_path / "fs"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    return str(proc), str(root)


@pytest.mark.parametrize("cpu_max, expected", [("max 100000\n", AFFINITY), ("50000 100000\n", 1),
                                               ("100000 100000\n", 1), ("150000 100000\n", min(2, AFFINITY))])
def test_cgroup_v2_quota_caps_the_affinity(tmp_path: Path, cpu_max: str, expected: int) -> None:
    proc, root = _tree(tmp_path, "0::/pod/app\n", {"pod/app/cpu.max": cpu_max})
    assert available_cpus(proc, root) == expected


def test_cgroup_v2_quota_of_an_ancestor_counts(tmp_path: Path) -> None:
    """A pod's limit sits on the pod's cgroup; the container's own may say "max"."""
    proc, root = _tree(tmp_path, "0::/pod/app\n", {"pod/cpu.max": "100000 100000\n", "pod/app/cpu.max": "max 100000\n"})
    assert available_cpus(proc, root) == 1


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    files = {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "100000\n", "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n"}
    proc, root = _tree(tmp_path, "4:cpu,cpuacct:/docker/x\n0::/\n", files)
    assert available_cpus(proc, root) == 1
    unlimited = {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    proc, root = _tree(tmp_path / "u", "1:cpu:/\n", unlimited)
    assert available_cpus(proc, root) == AFFINITY


def test_a_container_seeing_its_cgroup_as_the_mounts_root(tmp_path: Path) -> None:
    """cgroup v1 in a container: /proc/self/cgroup names the host's path, the mount holds only the container's."""
    files = {"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}
    proc, root = _tree(tmp_path, "1:cpu:/kubepods/pod1/abc\n", files)
    assert available_cpus(proc, root) == 1


def test_unreadable_or_odd_files_leave_the_affinity(tmp_path: Path) -> None:
    proc, root = _tree(tmp_path, "0::/a\n", {"a/cpu.max": "garbage\n"})
    assert available_cpus(proc, root) == AFFINITY
    assert available_cpus(str(tmp_path / "missing"), root) == AFFINITY
    proc, root = _tree(tmp_path / "z", "0::/a\n", {"a/cpu.max": "0 100000\n"})
    assert available_cpus(proc, root) == AFFINITY


def test_the_onnx_runtime_pool_defaults_to_the_available_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without `threads`, the big-batch session's pool is as wide as available_cpus() says (here made 1, as
    a container limited to one CPU would read it), not ONNX Runtime's own default of the machine's cores."""
    import aevae.runtimes as runtimes
    from aevae.runtimes import open_runtime
    from helpers import write_tiny

    version = write_tiny(tmp_path, "vae")
    monkeypatch.setattr(runtimes, "available_cpus", lambda: 1)
    runtime = open_runtime(version, "onnx")
    assert runtime.decoders[1].get_session_options().intra_op_num_threads == 1
    assert open_runtime(version, "onnx", threads=3).decoders[1].get_session_options().intra_op_num_threads == 3
