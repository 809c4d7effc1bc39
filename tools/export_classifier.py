"""Writes clients/web/static/digit-classifier.npz: the report's digit classifier, for the UI's sample validity.

The UI server judges decoded samples with the same classifier as `aevae report` (aevae.report.classifier: the
same recipe, training images and seed, hence the same cache entry and the same weights), applied with numpy.
This copies it out of the report's cache (training it first when the cache lacks it, a few seconds):

    .venv/bin/python tools/export_classifier.py --data-root ../shared/datasets

Plain arrays, no pickle (about 80 KB); the JSON `info` inside names the recipe and the training set.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "clients" / "web" / "static" / "digit-classifier.npz"


def main(argv: list[str] | None = None) -> int:
    from aevae import mnist
    from aevae.report import classifier as digit_classifier

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None, help="folder holding MNIST/raw/ (or AEVAE_DATA_ROOT)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the report's classifier cache")
    parser.add_argument("--seed", type=int, default=0, help="the report's --seed (default 0)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    data = mnist.load(args.data_root)
    count = min(digit_classifier.TRAIN_IMAGES, len(data.train.images))
    cache_dir = args.cache_dir or digit_classifier.default_cache_dir()
    images = data.train.images[:count].astype(np.float32) / 255.0  # exactly as the report passes them
    digit_classifier.load_or_train(images, data.train.labels[:count], data.sha256["train-images-idx3-ubyte"],
                                   cache_dir, seed=args.seed)
    source = digit_classifier.cache_path(cache_dir, data.sha256["train-images-idx3-ubyte"], count, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes) from {source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
