"""The digit classifier behind the sample-validity score, trained by the report and cached on disk.

Recipe, chosen by measurement (docs/report.md): average-pool the 32 x 32 image to 16 x 16, project onto the
first 50 principal components of the training digits, and classify with a one-hidden-layer MLP (scikit-learn).

A validity score needs a classifier that can also say "this is no digit". A discriminative classifier is
overconfident far from its training data (measured: an MLP that is sure about 90% of real test digits is also
sure about 18-30% of uniform-noise images, depending on how long it trains; a logistic regression trades one
for the other). So the classifier first checks that an image lies in the digits' subspace: the energy its PCA
projection leaves out must not exceed what 99.9% of the training digits leave out (digits: median 0.7,
noise: ~43). An image off the subspace gets no class at all (probability 0 for every digit).

The cache holds plain arrays (.npz, loaded with allow_pickle=False) and the prediction is a few lines of numpy,
so a cached classifier never unpickles anything and needs no scikit-learn at prediction time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from aevae.output import write_whole

RECIPE = {"pool": 2, "components": 50, "hidden": 100, "alpha": 1e-2, "max_iter": 40, "batch_size": 256,
          "residual_quantile": 0.999, "version": 2}
TRAIN_IMAGES = 20_000
CONFIDENCE = 0.9
CACHE_ENV = "AEVAE_CACHE_DIR"


def default_cache_dir() -> Path:
    """$AEVAE_CACHE_DIR, else $XDG_CACHE_HOME/aevae, else ~/.cache/aevae."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aevae"


def features_in(images: np.ndarray, pool: int = int(RECIPE["pool"])) -> np.ndarray:
    """N x H x W floats in [0, 1] -> N x (H/pool * W/pool) pooled pixels."""
    n, h, w = images.shape
    return np.asarray(images, dtype=np.float32).reshape(n, h // pool, pool, w // pool, pool).mean(axis=(2, 4)).reshape(n, -1)


@dataclass(frozen=True)
class DigitClassifier:
    """PCA projection, subspace gate and MLP weights as arrays; `probabilities` is the whole model."""

    pca_mean: np.ndarray
    pca_components: np.ndarray
    max_residual: float
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    info: dict

    def residuals(self, images: np.ndarray) -> np.ndarray:
        """Per image: the squared norm of the pooled pixels that the digits' PCA leaves out."""
        x = features_in(images) - self.pca_mean
        projected = (x @ self.pca_components.T) @ self.pca_components
        return ((x - projected) ** 2).sum(axis=1)

    def probabilities(self, images: np.ndarray, gate: bool = True, batch: int = 8192) -> np.ndarray:
        """N x 32 x 32 floats in [0, 1] -> N x 10 class probabilities; with `gate`, all zero for an image
        off the digits' subspace."""
        out = []
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            h = (features_in(chunk) - self.pca_mean) @ self.pca_components.T
            for i, (w, b) in enumerate(zip(self.weights, self.biases)):
                h = h @ w + b
                if i < len(self.weights) - 1:
                    h = np.maximum(h, 0.0)
            h = h - h.max(axis=1, keepdims=True)
            e = np.exp(h)
            p = e / e.sum(axis=1, keepdims=True)
            if gate:
                p = p * (self.residuals(chunk) <= self.max_residual)[:, None]
            out.append(p)
        return np.concatenate(out) if out else np.zeros((0, 10))

    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = {"pca_mean": self.pca_mean, "pca_components": self.pca_components,
                  "max_residual": np.float64(self.max_residual),
                  "info": np.frombuffer(json.dumps(self.info).encode(), dtype=np.uint8)}
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            arrays[f"w{i}"], arrays[f"b{i}"] = w, b
        path.parent.mkdir(parents=True, exist_ok=True)
        # whole: a concurrent report never reads half a file; ".npz" ending, or np.savez appends one
        write_whole(path, lambda tmp: np.savez(tmp, **arrays), tmp=f".{path.name}.{os.getpid()}.tmp.npz")

    @classmethod
    def load(cls, path: Path) -> "DigitClassifier":
        """ValueError for a file that is no .npz archive: np.load returned a .npy file's array (no context
        manager: a TypeError traceback) and took any other bytes for pickled data it would "load unsafely"."""
        with open(path, "rb") as f:
            magic = f.read(len(np.lib.format.MAGIC_PREFIX))
        if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a zip archive, as np.load tells them apart
            what = "a .npy array (numpy.save), not" if magic == np.lib.format.MAGIC_PREFIX else "not"
            raise ValueError(f"{what} an .npz archive (the digit classifier `aevae report` caches)")
        with np.load(path, allow_pickle=False) as data:
            layers = sum(1 for k in data.files if k.startswith("w"))
            return cls(pca_mean=data["pca_mean"], pca_components=data["pca_components"],
                       max_residual=float(data["max_residual"]),
                       weights=tuple(data[f"w{i}"] for i in range(layers)),
                       biases=tuple(data[f"b{i}"] for i in range(layers)),
                       info=json.loads(data["info"].tobytes().decode()))


def train(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[DigitClassifier, object]:
    """Fits the recipe on float images; returns the array form and the fitted scikit-learn MLP."""
    import warnings

    from sklearn.decomposition import PCA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    x = features_in(images)
    pca = PCA(n_components=RECIPE["components"], random_state=seed).fit(x)
    mlp = MLPClassifier(hidden_layer_sizes=(RECIPE["hidden"],), alpha=RECIPE["alpha"],
                        max_iter=RECIPE["max_iter"], batch_size=RECIPE["batch_size"], random_state=seed)
    # One BLAS thread: the matrices are small and extra threads mostly spin (measured on a busy 2-core
    # machine: 8.7 s with one thread, 34.5 s with two, for 5,000 images).
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # a fixed, short budget is the recipe
        mlp.fit(pca.transform(x), labels)
    residual = ((x - pca.inverse_transform(pca.transform(x))) ** 2).sum(axis=1)
    classifier = DigitClassifier(
        pca_mean=pca.mean_.astype(np.float32), pca_components=pca.components_.astype(np.float32),
        max_residual=float(np.quantile(residual, RECIPE["residual_quantile"])),
        weights=tuple(w.astype(np.float32) for w in mlp.coefs_),
        biases=tuple(b.astype(np.float32) for b in mlp.intercepts_),
        info={"recipe": RECIPE, "train_images": int(len(images)), "seed": seed})
    return classifier, mlp


def cache_path(cache_dir: Path, train_sha256: str, train_images: int, seed: int) -> Path:
    key = json.dumps({"recipe": RECIPE, "data": train_sha256, "n": train_images, "seed": seed}, sort_keys=True)
    return cache_dir / f"digit-classifier-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def load_or_train(images: np.ndarray, labels: np.ndarray, train_sha256: str, cache_dir: Path, seed: int = 0,
                  say: Callable[[str], None] = print) -> DigitClassifier:
    """The cached classifier for these training images, trained (and cached) first when missing."""
    path = cache_path(cache_dir, train_sha256, len(images), seed)
    if path.is_file():
        try:
            classifier = DigitClassifier.load(path)
            say(f"digit classifier: cached {path}")
            return classifier
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:  # a cut-short file
            say(f"digit classifier: ignoring unreadable cache {path} ({exc})")
    say(f"digit classifier: training on {len(images):,} MNIST training images (PCA {RECIPE['components']} + "
        f"MLP {RECIPE['hidden']}) ...")
    started = time.perf_counter()
    classifier, _ = train(images, labels, seed)
    seconds = time.perf_counter() - started
    classifier = replace(classifier, info={**classifier.info, "train_seconds": round(seconds, 1)})
    try:
        classifier.save(path)
    except OSError as exc:  # a file in the way, a read-only home: the report goes on, the next one trains again
        say(f"digit classifier: trained in {seconds:.1f}s, not cached ({path.parent}: {exc.strerror or exc}; "
            "pass a writable --cache-dir to keep it)")
        return classifier
    say(f"digit classifier: trained in {seconds:.1f}s, cached at {path}")
    return classifier


def confident(probabilities: np.ndarray, threshold: float = CONFIDENCE) -> np.ndarray:
    """Per image: does the classifier put at least `threshold` on one class?"""
    return probabilities.max(axis=1) >= threshold


def validity(probabilities: np.ndarray, threshold: float = CONFIDENCE) -> float:
    """The share of images the classifier assigns to one digit with probability >= threshold."""
    if len(probabilities) == 0:
        raise ValueError("validity of an empty set of images is undefined")
    return float(confident(probabilities, threshold).mean())
