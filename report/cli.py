"""`aevae report`: argument parsing only; the report itself is imported when the command runs."""

from __future__ import annotations

import argparse
import errno


MIN_TEST = 100
MIN_CLASSIFIER = 1000
MAX_SAMPLES = 100_000


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="measure the seed's figures and claims on the repository's models; "
                                      "writes an HTML page with PNG figures")
    p.add_argument("--models-dir", default=None, help="model repository (or AEVAE_MODELS_DIR; default ./models)")
    p.add_argument("--data-root", default=None, help="folder holding MNIST/raw/ (or AEVAE_DATA_ROOT)")
    # ./reports, not ./report: in a checkout that is this package's own folder (the page went among its sources)
    p.add_argument("--out", default="reports", help="output folder for index.html, figures/ and numbers.json "
                                                    "(default: ./reports)")
    p.add_argument("--samples", type=int, default=1000, help="random samples scored per source (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw and of the classifier (default: 0)")
    p.add_argument("--test-limit", type=int, default=None, metavar="N",
                   help="evaluate on the first N test images only (default: all 10,000)")
    p.add_argument("--no-ae2d", action="store_true",
                   help="do not train ae-2d when it is missing (the 2-d comparison is then left out)")
    p.add_argument("--ae2d-epochs", type=int, default=None, help="epochs for ae-2d (default: the ae's)")
    p.add_argument("--ae2d-train-limit", type=int, default=None, metavar="N",
                   help="train ae-2d on the first N images (default: the ae's training subset)")
    p.add_argument("--storage-path", default=None, help="where Ray keeps the ae-2d training's checkpoints")
    p.add_argument("--cache-dir", default=None,
                   help="digit classifier cache (default: AEVAE_CACHE_DIR or ~/.cache/aevae)")
    p.add_argument("--classifier-train-limit", type=int, default=None, metavar="N",
                   help="train the digit classifier on the first N training images (default: 20,000)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from pathlib import Path

    from aevae.errors import UserError
    from aevae.report.config import ReportConfig

    from aevae.trainer.config import MAX_SEED

    for name in ("samples", "test_limit", "ae2d_epochs", "ae2d_train_limit", "classifier_train_limit"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    # what the parts need: test pairs of different digits and 16 reconstructions (the first 100 test images
    # hold every digit), a classifier's 50 PCA components and ten classes, samples that fit in memory
    for name, least, most in (("test_limit", MIN_TEST, None), ("classifier_train_limit", MIN_CLASSIFIER, None),
                              ("samples", 1, MAX_SAMPLES)):
        value = getattr(args, name)
        if value is not None and (value < least or (most is not None and value > most)):
            span = f"from {least:,} to {most:,}" if most is not None else f"of at least {least:,}"
            raise UserError(f"--{name.replace('_', '-')} must be a whole number {span}, got {value:,}")
    if not str(args.out).strip():  # an empty --out was the current folder: the page went among its files
        raise UserError("--out is empty; name the folder for the report, e.g. --out reports")
    # numpy's generators take no seed below 0 (that was a traceback), and the ae-2d run trains with it: the
    # trainer's range
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be an integer from 0 to {MAX_SEED}, got {args.seed}")
    config = ReportConfig(
        models_dir=args.models_dir, data_root=args.data_root, out=Path(args.out), samples=args.samples,
        seed=args.seed, test_limit=args.test_limit, ae2d=not args.no_ae2d, ae2d_epochs=args.ae2d_epochs,
        ae2d_train_limit=args.ae2d_train_limit, storage_path=args.storage_path,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    if args.classifier_train_limit:
        config.classifier_train_limit = args.classifier_train_limit
    return config


def run(args: argparse.Namespace) -> int:
    from aevae import mnist
    from aevae.errors import FailedPrecondition, NotFound, UserError
    from aevae.report import build
    from aevae.report.config import ReportError

    config = config_from_args(args)
    try:
        build.run(config)
    except (mnist.MnistError, NotFound, FailedPrecondition, ReportError) as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:  # a full disk while the figures are written was a matplotlib traceback
        where = exc.filename or f"a file under --out {config.out}"
        hint = "; free some space or pass another --out" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise UserError(f"the report stopped: {exc.strerror or exc} ({where}){hint}") from None
    return 0
