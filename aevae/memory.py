"""How much memory this process may still take, and the check of a big allocation against it.

Without the check, a model too big for the machine was built anyway: `aevae train --hidden 60000,60000` asked
for tens of GiB and ended in the kernel's out-of-memory killer, which may pick any process on the machine, and
a decoder in a 2 GiB container loading a version of 8192-wide layers was killed (and restarted, and killed
again) instead of refusing that one version. What is available is the kernel's estimate (MemAvailable), capped by
the room left under the tightest memory limit of the process's cgroups (`aevae.cgroups`).
"""

from __future__ import annotations

from pathlib import Path

from aevae.cgroups import folders, read_int

GIB = 1 << 30


def available_bytes(proc_cgroup: str = "/proc/self/cgroup", cgroup_root: str = "/sys/fs/cgroup",
                    meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes this process could allocate now; None when neither /proc/meminfo nor a cgroup limit says (not
    Linux): then nothing is refused."""
    room = [_mem_available(meminfo)]
    for version, folder in folders("memory", proc_cgroup, cgroup_root):
        if version == 2:
            limit, used = read_int(folder / "memory.max"), read_int(folder / "memory.current")
        else:
            limit, used = read_int(folder / "memory.limit_in_bytes"), read_int(folder / "memory.usage_in_bytes")
        if limit is not None and used is not None and limit < 1 << 62:  # v1 says "no limit" with ~2**63
            room.append(max(0, limit - used))
    known = [r for r in room if r is not None]
    return min(known) if known else None


def _mem_available(meminfo: str) -> int | None:
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return None


def shortfall(needed: int, available: int | None = None) -> str | None:
    """Why `needed` bytes will not fit, in words for "... needs {shortfall}" ("14.2 GiB, and 3.1 GiB is
    available"); None when they fit or nothing is known. `available` defaults to available_bytes()."""
    if available is None:
        available = available_bytes()
    if available is None or needed <= available:
        return None
    return f"{_gib(needed)}, and {_gib(available)} is available"


def _gib(size: int) -> str:
    return f"{size / GIB:,.1f} GiB"


# The address space (virtual memory, `ulimit -v`) a service needs: a decoder serving both default models peaked
# at 1.25 GiB of it (14 threads, each reserving its stack, and the runtimes' arenas). Under a lower limit gRPC's
# core aborted the whole process when it could not start a thread (SIGABRT at 300-500 MiB, every call in
# flight lost) and ONNX Runtime's library could not be mapped.
SERVICE_ADDRESS_SPACE = 3 * GIB // 2


def address_space_refusal(needed: int, what: str) -> str | None:
    """Raises this process's soft address-space limit to its hard one; then why `what` cannot run in the room
    left, or None when it can (no limit, or enough)."""
    import resource

    from aevae.rlimits import raise_soft_limit

    soft = raise_soft_limit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    return (f"this process's address space is limited to {soft >> 20:,} MiB (ulimit -v {soft >> 10}); {what} "
            f"needs {needed >> 20:,} MiB or more of it (its threads' stacks and the model runtimes' libraries; "
            "gRPC aborts the whole process when it cannot start a thread): raise or remove the limit, and bound "
            "memory with a container's or cgroup's limit instead, which counts what is used")
