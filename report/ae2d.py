"""The 2-d AE that tests the seed's claim "two AE latents do as well as four VAE latents".

It lives in the same repository under its own name, `ae-2d`, so that it never becomes the newest `ae`. When it
is missing, the report trains it with the real trainer and the 4-d AE's own training settings (epochs, batch,
learning rate, seed, hidden layers, training subset), so that the comparison changes one thing: the latent size.
"""

from __future__ import annotations

from aevae.errors import FailedPrecondition, NotFound
from aevae.inference import LoadedModel
from aevae.store import ModelStore

NAME = "ae-2d"
LATENT_DIM = 2


def find(store: ModelStore) -> LoadedModel | None:
    try:
        return store.get(NAME)
    except (NotFound, FailedPrecondition):
        return None


def unfit(model: LoadedModel) -> str | None:
    """Why a model found under NAME cannot stand for the 2-d AE (another kind, another latent size), or None."""
    if model.manifest.kind != "ae" or model.latent_dim != LATENT_DIM:
        kind = model.manifest.kind.upper()
        return (f"{model.name}/{model.number} is {'an' if kind == 'AE' else 'a'} {kind} with a {model.latent_dim}-d "
                f"latent; the comparison needs an AE with a {LATENT_DIM}-d latent")
    return None


def train(store: ModelStore, reference: LoadedModel, data_root: str | None, epochs: int | None = None,
          train_limit: int | None = None, storage_path: str | None = None) -> LoadedModel:
    """Trains `ae-2d` like `reference` (the 4-d AE) but with a 2-d latent; the trainer prints its progress."""
    try:
        import ray

        from aevae.trainer import job
        from aevae.trainer.config import TrainConfig
    except ImportError as exc:
        from aevae.report.config import ReportError

        raise ReportError(f"{NAME} is missing and training it needs the trainer ({exc}): install the `train` "
                          f"extra (pip install 'aevae[train]'), train it with `aevae train --models ae --name "
                          f"{NAME} --latent-dim {LATENT_DIM}`, or pass --no-ae2d") from None

    training = reference.manifest.training
    defaults = TrainConfig()
    config = TrainConfig(
        models=("ae",), name=NAME, latent_dim=LATENT_DIM,
        epochs=epochs or int(training.get("epochs", defaults.epochs)),
        batch_size=int(training.get("batch_size", defaults.batch_size)),
        lr=float(training.get("lr", defaults.lr)),
        seed=int(training.get("seed", defaults.seed)),
        hidden=tuple(reference.manifest.architecture.get("hidden", defaults.hidden)),
        train_limit=train_limit or training.get("train_limit"),
        # the AE's own precision: versions from before the setting trained in fp32
        precision=str(training.get("precision", "fp32")),
        data_root=data_root, models_dir=str(store.repository.root), storage_path=storage_path,
    )
    subset = f"first {config.train_limit:,}" if config.train_limit else "all"
    print(f"{NAME} is missing: training it like {reference.name}/{reference.number} with a {LATENT_DIM}-d latent "
          f"({config.epochs} epoch{'' if config.epochs == 1 else 's'}, {subset} training images)", flush=True)
    started_ray = not ray.is_initialized()
    try:
        job.run(config)
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()  # the report needs no cluster after this; give the cores back
    store.scan(force=True)
    return store.get(NAME)
