"""How many CPUs this process may use: the default width of the model runtimes' thread pools.

ONNX Runtime and torch size their pools to the machine's cores by default, which neither a container's
`--cpus` nor a pod's CPU limit changes (both are a cgroup quota, not fewer cores): on a 64-core node, a
decoder limited to 2 CPUs ran a 64-thread pool throttled to 2 CPUs' time (onnxruntime#29510). A quota is
read from cgroup v2's `cpu.max` along the process's cgroup path, or cgroup v1's `cpu.cfs_quota_us`
(`aevae.cgroups` walks the folders).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from aevae.cgroups import folders, read_int


def available_cpus(proc_cgroup: str = "/proc/self/cgroup", cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The CPUs in this process's affinity mask, capped by its cgroup's CPU quota (rounded up), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _quota(proc_cgroup, Path(cgroup_root))
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def _quota(proc_cgroup: str, root: Path) -> float | None:
    """The smallest CPU quota (in CPUs) of the process's cgroup and its ancestors (`aevae.cgroups`); None
    without one, or when the files cannot be read (no cgroups, another layout): then only the affinity counts."""
    quotas = [_v2(folder) if version == 2 else _v1(folder) for version, folder in folders("cpu", proc_cgroup, root)]
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _v2(folder: Path) -> float | None:
    """cpu.max: "QUOTA PERIOD", or "max PERIOD" for none."""
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return _ratio(quota, period)


def _v1(folder: Path) -> float | None:
    """cpu.cfs_quota_us / cpu.cfs_period_us; a quota of -1 is none."""
    quota, period = read_int(folder / "cpu.cfs_quota_us"), read_int(folder / "cpu.cfs_period_us")
    return None if quota is None or period is None else _ratio(str(quota), str(period))


def _ratio(quota: str, period: str) -> float | None:
    """QUOTA / PERIOD in CPUs; None when there is no quota ("max", -1) or they do not read as numbers."""
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None
