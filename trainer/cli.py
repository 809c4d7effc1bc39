"""`aevae train`: argument parsing only; the job itself is imported when the command runs."""

from __future__ import annotations

import argparse

# The widest layer --hidden and --latent-dim accept: past it a model outgrows this kind of machine (a 65,536 x
# 1,024 float32 layer alone is 256 MB, and Adam keeps three copies) and fails late, in the worker.
MAX_WIDTH = 65_536


def register(sub: argparse._SubParsersAction) -> None:
    from aevae.help_format import DefaultsFormatter
    from aevae.trainer.config import PRECISIONS, TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train the AE and the VAE with Ray Train and write model versions",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--models", default=",".join(d.models), help="comma-separated kinds to train: ae, vae")
    p.add_argument("--name", default=None,
                   help="repository name to write under instead of the kind, e.g. ae-2d (one model only)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, split over workers")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the initial weights, the batch order and the latent statistics' sample")
    p.add_argument("--latent-dim", type=int, default=d.latent_dim, help="dimensions of the latent space")
    p.add_argument("--hidden", default=",".join(map(str, d.hidden)), help="hidden layer widths, encoder side")
    p.add_argument("--train-limit", type=int, default=None, metavar="N", help="train on the first N images only")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="Ray Train workers (DDP, gloo)")
    p.add_argument("--cpus-per-worker", type=int, default=None,
                   help="CPUs (and torch threads) per worker; default: this machine's CPUs / workers")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="training precision: bf16 runs the matrix products in bfloat16 (CPU autocast), the loss, "
                        "weights and optimizer state stay float32")
    p.add_argument("--data-root", default=None, help="folder holding MNIST/raw/ (or AEVAE_DATA_ROOT)")
    p.add_argument("--models-dir", default=None, help="model repository (or AEVAE_MODELS_DIR; default ./models)")
    p.add_argument("--storage-path", default=d.storage_path,
                   help="where Ray keeps its run checkpoints, a folder or a storage URI (default: %(default)s, "
                        "that is $TMPDIR/aevae-ray)")
    p.add_argument("--address", default=None, help="an existing Ray cluster, e.g. ray://head:10001 or auto")
    p.add_argument("--resume", action="store_true",
                   help="continue the newest stopped or failed run of the same options from its last checkpoint "
                        "under --storage-path (a fresh run when there is none)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    import os

    from aevae.errors import UserError, require_positive
    from aevae.manifest import KINDS
    from aevae.trainer.config import TrainConfig

    for name in ("epochs", "batch_size", "lr", "latent_dim", "train_limit", "num_workers", "cpus_per_worker"):
        require_positive("--" + name.replace("_", "-"), getattr(args, name))
    models = tuple(dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip()))  # once each, in order
    if not models or any(m not in KINDS for m in models):
        raise UserError(f"--models accepts a comma-separated list of ae and vae, got {args.models!r}")
    if args.name and len(models) != 1:
        raise UserError("--name needs exactly one model in --models")
    try:
        hidden = tuple(int(h) for h in args.hidden.split(","))
    except ValueError:
        hidden = ()
    if not hidden or not all(1 <= h <= MAX_WIDTH for h in hidden):
        raise UserError(f"--hidden takes comma-separated layer widths from 1 to {MAX_WIDTH:,}, e.g. 1024,512,256; "
                        f"got {args.hidden!r}")
    if args.latent_dim > MAX_WIDTH:
        raise UserError(f"--latent-dim must be at most {MAX_WIDTH:,}, got {args.latent_dim}")
    cpus = args.cpus_per_worker or max(1, (os.cpu_count() or 1) // args.num_workers)
    try:
        return TrainConfig(
            models=models, name=args.name, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            seed=args.seed, latent_dim=args.latent_dim, hidden=hidden, train_limit=args.train_limit,
            num_workers=args.num_workers, cpus_per_worker=cpus, data_root=args.data_root,
            models_dir=args.models_dir, storage_path=args.storage_path, address=args.address,
            precision=args.precision, resume=args.resume,
        )
    except ValueError as exc:  # TrainConfig's own checks (e.g. --name), worded for the command line
        raise UserError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from aevae.errors import UserError

    try:
        from aevae import mnist
        from aevae.trainer import job
    except ImportError as exc:
        raise UserError(f"training needs the train extra ({exc.name} is missing): pip install 'aevae[train]'") from None

    config = config_from_args(args)
    try:
        job.run(config)
    except mnist.MnistError as exc:  # one line: a failed download's text holds torchvision's several
        raise UserError(" ".join(str(exc).split())) from None
    return 0
