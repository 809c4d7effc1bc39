"""The report's digit-classifier cache: one that cannot be written costs the cache, not the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aevae.report import classifier as digit_classifier


def _tiny(*args: object) -> tuple[digit_classifier.DigitClassifier, dict]:
    return digit_classifier.DigitClassifier(np.zeros(4), np.eye(4), 1.0, (np.zeros((4, 10)),), (np.zeros(10),), {}), {}


@pytest.mark.parametrize("blocker", ["file", "read-only"])
def test_a_cache_that_cannot_be_written_is_said_and_the_classifier_returned(
        blocker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --cache-dir that is a file, or a read-only home, ended the report with a traceback after the classifier
    had been trained, and threw it away."""
    import os

    monkeypatch.setattr(digit_classifier, "train", _tiny)
    cache = tmp_path / "cache"
    if blocker == "file":
        cache.write_text("not a folder")
    else:
        cache.mkdir()
        monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    said: list[str] = []
    images = np.zeros((3, 32, 32), np.float32)
    got = digit_classifier.load_or_train(images, np.zeros(3, int), "abc", cache, say=said.append)
    assert got.max_residual == 1.0 and "train_seconds" in got.info
    assert "not cached" in said[-1] and "pass a writable --cache-dir" in said[-1], said
    assert blocker == "file" or list(cache.iterdir()) == []  # no temporary left behind
