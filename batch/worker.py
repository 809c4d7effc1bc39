"""The Ray Data actor: holds the model, turns each shard index it is given into a written shard."""

from __future__ import annotations

from typing import Any

import numpy as np


class ShardWorker:
    """`map_batches(ShardWorker, ...)` over a dataset of shard indices; returns one row of stats per shard."""

    def __init__(self, job: Any, threads: int | None = None):
        from aevae.batch.model import Loaded

        self.job = job
        self.model = Loaded(job.model, threads)
        self.node = _node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from aevae.batch.job import run_shard
        from aevae.errors import UserError

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
