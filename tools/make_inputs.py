"""Writes static/inputs.json: the input images on the left of the page.

Two MNIST test digits per class, plus three images that are not digits (a question mark, a letter and a
stick figure), drawn here so that the project owns them. They are 28 x 28 like MNIST, white on black, and the
services pad them to 32 x 32 as in training. Run once when the set should change; the JSON is committed:

    .venv/bin/python tools/make_inputs.py --data-root ../shared/datasets
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "clients" / "web" / "static" / "inputs.json"
PER_DIGIT = 2
SIZE = 28
SUPERSAMPLE = 8  # drawn large and box-filtered down, for MNIST-like soft strokes


def mnist_digits(data_root: str | None) -> list[dict]:
    from aevae.mnist import PAD, load

    test = load(data_root).test
    items = []
    for digit in range(10):
        for index in np.flatnonzero(test.labels == digit)[:PER_DIGIT]:
            crop = test.images[index, PAD:PAD + SIZE, PAD:PAD + SIZE]
            items.append({"name": f"test #{int(index)}", "label": digit, "pixels": crop})
    return items


def _canvas():
    from PIL import Image, ImageDraw

    image = Image.new("L", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE), 0)
    return image, ImageDraw.Draw(image)


def _shrink(image) -> np.ndarray:
    from PIL import Image

    return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.uint8)


def question_mark() -> np.ndarray:
    s = SUPERSAMPLE
    image, draw = _canvas()
    width = int(2.6 * s)
    draw.arc((8 * s, 4 * s, 20 * s, 15 * s), start=180, end=90, fill=255, width=width)
    draw.line((14 * s, 15 * s, 14 * s, 19 * s), fill=255, width=width)
    draw.ellipse((12.6 * s, 21.2 * s, 15.4 * s, 24 * s), fill=255)
    return _shrink(image)


def letter_a() -> np.ndarray:
    s = SUPERSAMPLE
    image, draw = _canvas()
    width = int(2.6 * s)
    draw.line((7 * s, 24 * s, 14 * s, 4 * s, 21 * s, 24 * s), fill=255, width=width, joint="curve")
    draw.line((9.6 * s, 17 * s, 18.4 * s, 17 * s), fill=255, width=width)
    return _shrink(image)


def stick_figure() -> np.ndarray:
    s = SUPERSAMPLE
    image, draw = _canvas()
    width = int(2.0 * s)
    draw.ellipse((11 * s, 3 * s, 17 * s, 9 * s), outline=255, width=width)
    draw.line((14 * s, 9 * s, 14 * s, 17 * s), fill=255, width=width)          # body
    draw.line((8 * s, 12 * s, 20 * s, 12 * s), fill=255, width=width)          # arms
    draw.line((14 * s, 17 * s, 9 * s, 25 * s), fill=255, width=width)          # legs
    draw.line((14 * s, 17 * s, 19 * s, 25 * s), fill=255, width=width)
    return _shrink(image)


def project_images() -> list[dict]:
    return [
        {"name": "question mark", "label": None, "pixels": question_mark()},
        {"name": "letter A", "label": None, "pixels": letter_a()},
        {"name": "stick figure", "label": None, "pixels": stick_figure()},
    ]


def encode_item(item: dict) -> dict:
    pixels = np.ascontiguousarray(item["pixels"], dtype=np.uint8)
    assert pixels.shape == (SIZE, SIZE)
    return {"name": item["name"], "label": item["label"], "shape": [SIZE, SIZE],
            "pixels": base64.b64encode(pixels.tobytes()).decode("ascii")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None, help="folder holding MNIST/raw/ (or AEVAE_DATA_ROOT)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    items = [encode_item(item) for item in mnist_digits(args.data_root) + project_images()]
    args.out.write_text(json.dumps({"format": "uint8 row-major, white on black, base64", "items": items},
                                   indent=1) + "\n")
    print(f"wrote {len(items)} input images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
