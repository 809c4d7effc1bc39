"""The process's soft resource limits, raised to their hard ones where a service needs more.

One owner for what the open files (each connection takes a descriptor) and the address space (`ulimit -v`:
threads' stacks, the runtimes' libraries) both need: a process may raise its own soft limit up to the hard
one, and systemd, containers and shells often leave the soft one low.
"""

from __future__ import annotations

import resource


def raise_soft_limit(kind: int) -> int:
    """Raises the soft limit of `kind` (a resource.RLIMIT_*) to its hard limit and returns the soft limit then
    (resource.RLIM_INFINITY for none). A limit the kernel refuses to raise (an unlimited hard one some kernels
    refuse as a soft one) stays as it was."""
    soft, hard = resource.getrlimit(kind)
    if soft != hard:
        try:
            resource.setrlimit(kind, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft
