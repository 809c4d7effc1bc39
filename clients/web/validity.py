"""Sample validity in the UI: the report's digit classifier, applied with numpy (the UI server needs no torch).

The classifier is the one `aevae report` trains and caches (aevae.report.classifier: pooling, PCA, a small
MLP, and the check that an image lies on the digits' subspace), exported once as plain arrays by
`tools/export_classifier.py` into static/digit-classifier.npz. A sample counts as valid exactly as in the
report: the classifier puts probability >= 0.9 on one digit.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aevae.report.classifier import CONFIDENCE, RECIPE, DigitClassifier

DEFAULT_PATH = Path(__file__).with_name("static") / "digit-classifier.npz"


@dataclass(frozen=True)
class Verdicts:
    digits: list[int | None]  # the digit for a valid image, else None
    confidence: list[float]  # the highest class probability (0 for an image off the digits' subspace)
    valid: list[bool]

    def as_dict(self) -> dict[str, Any]:
        return {"digits": self.digits, "confidence": [round(c, 4) for c in self.confidence], "valid": self.valid,
                "valid_count": sum(self.valid)}


class Judge:
    """The classifier, or the reason there is none; `judge` scores decoded float images in [0, 1]."""

    def __init__(self, path: Path | None = DEFAULT_PATH):
        self.path = path
        self.classifier: DigitClassifier | None = None
        self.reason = ""
        if path is None:
            self.reason = "no digit classifier configured"
            return
        try:
            self.classifier = DigitClassifier.load(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # a truncated .npz: BadZipFile
            self.reason = f"digit classifier not loaded from {path}: {exc} (tools/export_classifier.py writes it)"

    @property
    def image_shape(self) -> tuple[int, int] | None:
        """The image shape the classifier was trained on (its pooled features times the pooling, squared)."""
        if self.classifier is None:
            return None
        pool = int(self.classifier.info.get("recipe", RECIPE).get("pool", RECIPE["pool"]))
        side = int(round(np.sqrt(self.classifier.pca_mean.shape[0]))) * pool
        return side, side

    def describe(self) -> dict[str, Any]:
        if self.classifier is None:
            return {"available": False, "reason": self.reason}
        info = self.classifier.info
        return {"available": True, "threshold": CONFIDENCE, "image_shape": list(self.image_shape or ()),
                "train_images": info.get("train_images"), "recipe": info.get("recipe")}

    def unavailable_for(self, shape: tuple[int, ...]) -> str:
        """Why these images cannot be judged ("" when they can)."""
        if self.classifier is None:
            return self.reason
        if tuple(shape) != self.image_shape:
            expected = " x ".join(map(str, self.image_shape or ()))
            return f"the digit classifier reads {expected} images, the model makes {' x '.join(map(str, shape))}"
        return ""

    def judge(self, images: np.ndarray) -> Verdicts:
        assert self.classifier is not None
        probabilities = self.classifier.probabilities(np.asarray(images, dtype=np.float32))
        best = probabilities.max(axis=1)
        valid = best >= CONFIDENCE
        digits = [int(d) if ok else None for d, ok in zip(probabilities.argmax(axis=1), valid)]
        return Verdicts(digits=digits, confidence=[float(b) for b in best], valid=[bool(v) for v in valid])
