"""How many CPUs this process may use: the default width of the model runtimes' thread pools.

ONNX Runtime and torch size their pools to the machine's cores by default, which neither a container's
`--cpus` nor a pod's CPU limit changes (both are a cgroup quota, not fewer cores): on a 64-core node, a
decoder limited to 2 CPUs ran a 64-thread pool throttled to 2 CPUs' time (onnxruntime#29510). A quota is
read from cgroup v2's `cpu.max` along the process's cgroup path, or cgroup v1's `cpu.cfs_quota_us`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


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
    """The smallest CPU quota (in CPUs) of the process's cgroup and its ancestors; None without one, or when
    the files cannot be read (no cgroups, another layout): then only the affinity counts."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if controllers == "":  # cgroup v2 (the unified hierarchy)
            base = root / "unified" if (root / "unified").is_dir() else root  # a hybrid layout mounts it there
            quotas += [q for q in _v2(base, path) if q is not None]
        elif "cpu" in controllers.split(","):
            quota = _v1(root / controllers, path)
            if quota is not None:
                quotas.append(quota)
    return min(quotas) if quotas else None


def _v2(base: Path, path: str) -> list[float | None]:
    """cpu.max ("QUOTA PERIOD" or "max PERIOD") of the cgroup at `path` and of each ancestor."""
    found: list[float | None] = []
    folder = base / path.lstrip("/")
    while True:
        found.append(_ratio(folder / "cpu.max", None))
        if folder == base or base not in folder.parents:
            return found
        folder = folder.parent


def _v1(mount: Path, path: str) -> float | None:
    """cpu.cfs_quota_us / cpu.cfs_period_us of the cgroup at `path` (or, in a container that sees its own
    cgroup as the mount's root, of the mount's root); -1: no quota."""
    for folder in (mount / path.lstrip("/"), mount):
        quota = _ratio(folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us")
        if quota is not None or (folder / "cpu.cfs_quota_us").exists():
            return quota
    return None


def _ratio(quota_file: Path, period_file: Path | None) -> float | None:
    """QUOTA / PERIOD in CPUs; None when there is no quota ("max", -1) or the files do not read as numbers."""
    try:
        text = quota_file.read_text().split()
        quota, period = (text[0], text[1]) if period_file is None else (text[0], period_file.read_text().strip())
        if quota in ("max", "-1"):
            return None
        q, p = int(quota), int(period)
    except (OSError, IndexError, ValueError):
        return None
    return q / p if q > 0 and p > 0 else None
