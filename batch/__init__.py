"""Batch jobs: `aevae decode-batch` and `aevae encode-batch`.

Millions of latents to images (or images to latents) as a sharded job: on Ray Data (an actor pool holding the
model, local or on a cluster) or through a running fleet of decoder/encoder services (the fan-out client).
Every shard is written atomically under its own name, so a rerun skips what is done and ids keep the input's
order. Details: docs/batch.md.
"""
