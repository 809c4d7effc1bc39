"""The cgroup folders that limit this process: one owner of the walk, for the CPU quota (`aevae.cpus`) and the
memory limit (`aevae.memory`).

A limit may sit on the process's own cgroup or on any ancestor (a pod's on the pod's cgroup, the container's own
saying "max"), so every folder from the process's cgroup up to the hierarchy's root is read, and the tightest
limit wins. /proc/self/cgroup names the path under each hierarchy: "0::/path" for cgroup v2 (the unified
hierarchy, mounted at the root, or at `unified/` in a hybrid layout), "N:controllers:/path" for a v1 hierarchy
mounted at `controllers/`. A container often sees its own cgroup as the mount's root while /proc/self/cgroup
still names the host's path; then the mount's root is the folder to read.
"""

from __future__ import annotations

from pathlib import Path


def folders(controller: str, proc_cgroup: str = "/proc/self/cgroup",
            root: str | Path = "/sys/fs/cgroup") -> list[tuple[int, Path]]:
    """(cgroup version, folder) for every cgroup folder that may hold a limit of `controller` ("cpu",
    "memory") on this process, innermost first; empty without cgroups or when /proc/self/cgroup cannot be read.
    The v2 folders are listed whatever the controller: a v2 folder without the controller lacks its files."""
    root = Path(root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return []
    found: list[tuple[int, Path]] = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = root / "unified" if (root / "unified").is_dir() else root
            found += [(2, folder) for folder in _up_to(base, path)]
        elif controller in controllers.split(","):
            found += [(1, folder) for folder in _up_to(root / controllers, path)]
    return found


def _up_to(mount: Path, path: str) -> list[Path]:
    """The folder of cgroup `path` under `mount` and each ancestor up to `mount`; just `mount` when that
    folder is not there (a container seeing its own cgroup as the mount's root)."""
    folder = mount / path.lstrip("/")
    if not folder.is_dir() or mount not in (folder, *folder.parents):
        return [mount]
    chain = [folder]
    while folder != mount:
        folder = folder.parent
        chain.append(folder)
    return chain


def read_int(path: Path) -> int | None:
    """The first word of a cgroup file as an integer; None when it says "max" (no limit) or cannot be read."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
