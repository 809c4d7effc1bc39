"""The Ray Data actor: holds the model, turns each shard index it is given into a written shard."""

from __future__ import annotations

from typing import Any

import numpy as np


class ShardWorker:
    """`map_batches(ShardWorker, ...)` over a dataset of shard indices; returns one row of stats per shard."""

    def __init__(self, job: Any, threads: int | None = None):
        from aevae.batch.model import Loaded

        self.job = job
        self.node = _node_id()
        self.model: Any = None
        self.problem: str | None = None
        try:
            self.model = Loaded(job.model, threads)
        except Exception as exc:  # noqa: BLE001 - a version damaged or removed after the driver checked it
            # Raised here, the actor would die in its constructor: Ray retries it without end, prints each
            # death's traceback on the driver, and the job ends in a screen of them. Reported with the first
            # shard instead, as bad data is.
            ref = job.model
            self.problem = (f"model {ref.name}/{ref.number} in {ref.models_dir} could not be loaded by a worker: "
                            f"{' '.join(str(exc).split())}. It changed after the job checked it; restore it (or "
                            f"start over on another version with --version N --overwrite) and run the same command "
                            "again to resume")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from aevae.batch.job import run_shard
        from aevae.errors import UserError

        if self.problem is not None:
            return {"error": np.array([self.problem])}
        try:
            stats = [dict(run_shard(self.job, self.model, int(shard)), node=self.node) for shard in batch["shard"]]
        except UserError as exc:
            # Bad data, not a broken worker: returned as a row, because an exception reaches the driver as
            # Ray Data's "UDF failed" around a remote traceback; run_ray raises it there with this message.
            return {"error": np.array([str(exc)])}
        return {key: np.array([s[key] for s in stats]) for key in stats[0]}


def _node_id() -> str:
    """The Ray node this worker runs on; "" outside Ray. Asked only of an initialized Ray: outside one,
    ray.get_runtime_context() starts a whole local Ray in the calling process (it did, in the test process,
    which then could not start its own)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - Ray not installed, or a context without a node
        return ""
