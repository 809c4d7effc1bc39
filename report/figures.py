"""The report's matplotlib figures, one function per figure; each writes a PNG and returns its path.

Image grids are tiled into one array and drawn with a single imshow: a 64-image grid costs one artist, not 64
axes, which keeps the whole report's drawing time in the seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from aevae.output import write_whole

import matplotlib

matplotlib.use("Agg")  # files only, no display: the report runs on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"ae": "tab:orange", "vae": "tab:blue", "ae-2d": "tab:green"}
DPI = 110


def color(name: str) -> str:
    return COLORS.get(name, "tab:gray")


def tile(images: np.ndarray, cols: int, pad: int = 2, fill: float = 1.0) -> np.ndarray:
    """N x h x w -> one image of ceil(N / cols) rows, with `pad` pixels of `fill` between tiles."""
    n, h, w = images.shape
    rows = max(1, -(-n // cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), fill, dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = image
    return out


def _save(fig: plt.Figure, path: Path) -> Path:
    """Writes the figure whole or not at all (a temporary renamed into place): a stop or a full disk during
    the write left a truncated PNG under the figure's name, which a page then showed as broken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_whole(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=DPI,
                                                  bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def reconstructions(originals: np.ndarray, rows: Mapping[str, np.ndarray], path: Path) -> Path:
    """One row of test digits, then one row per model with its reconstructions of them."""
    labels = ["test digits", *rows]
    grid = tile(np.concatenate([originals, *rows.values()]), cols=len(originals))
    fig, ax = plt.subplots(figsize=(len(originals) * 0.55 + 1.2, len(labels) * 0.6 + 0.3))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
    h = originals.shape[1] + 2
    ax.set_yticks([2 + h * i + h / 2 - 1 for i in range(len(labels))], labels)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    return _save(fig, path)


def pca_scatter(projections: Mapping[str, tuple[np.ndarray, np.ndarray, Sequence[float]]], path: Path) -> Path:
    """The seed's Figure 4: per model the 2-D PCA of its training latents, coloured by digit."""
    fig, axes = plt.subplots(1, len(projections), figsize=(5.2 * len(projections), 4.8), squeeze=False)
    for ax, (name, (points, labels, ratio)) in zip(axes[0], projections.items()):
        scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5, s=5,
                             alpha=0.8, linewidths=0)
        ax.set_title(f"{name}: PCA of training latents\n(explained variance {sum(ratio):.0%})")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    bar = fig.colorbar(scatter, ax=axes[0].tolist(), ticks=range(10), shrink=0.85)
    bar.set_label("digit")
    return _save(fig, path)


def violins(dims_by_model: Mapping[str, list[dict]], path: Path) -> Path:
    """Per latent dimension, the training-set density of each model side by side, on one shared scale."""
    names = list(dims_by_model)
    n_dims = max(len(d) for d in dims_by_model.values())
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * n_dims, 4.8))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        for i, dim in enumerate(dims_by_model[name]):
            grid, dens = np.asarray(dim["grid"]), np.asarray(dim["density"])
            centre = i + (k - (len(names) - 1) / 2) * width
            half = 0.45 * width * dens / dens.max()
            ax.fill_betweenx(grid, centre - half, centre + half, color=color(name), alpha=0.6,
                             label=name if i == 0 else None, linewidth=0)
            ax.plot([centre - 0.45 * width, centre + 0.45 * width], [dim["quantiles"]["0.5"]] * 2,
                    color="black", linewidth=1)
    ax.set_xticks(range(n_dims), [f"z{i + 1}" for i in range(n_dims)])
    ax.set_ylabel("latent value")
    ax.set_title("Latent dimensions over the training set (one scale; black: median)")
    ax.axhline(0, color="gray", linewidth=0.5)
    ax.legend(loc="upper right")
    return _save(fig, path)


def sample_grids(grids: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, cols: int = 8) -> Path:
    """Decoded samples, one 8 x 8 panel per source; a green frame marks each sample counted valid."""
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(1, len(grids), figsize=(3.9 * len(grids), 4.5), squeeze=False)
    for ax, (title, (images, valid)) in zip(axes[0], grids.items()):
        ax.imshow(tile(images, cols), cmap="gray", vmin=0, vmax=1)
        h, w = images.shape[1:]
        for i in np.flatnonzero(valid):
            r, c = divmod(int(i), cols)
            ax.add_patch(Rectangle((1 + c * (w + 2) - 0.5, 1 + r * (h + 2) - 0.5), w + 1, h + 1, fill=False,
                                   edgecolor="#1dd15c", linewidth=1.6))
        ax.set_title(f"{title}\n{int(np.sum(valid))} of {len(valid)} valid (green frame)", fontsize=10)
        ax.axis("off")
    return _save(fig, path)


def interpolations(figure: Mapping, path: Path) -> Path:
    """For a few test pairs, each model's frames from one digit to the other, with the classifier's digit
    (or "-") under each frame."""
    names = list(figure["rows"])
    pairs = figure["pairs"]
    blocks = []
    labels = []
    for p, pair in enumerate(pairs):
        for name in names:
            images, digits = figure["rows"][name]
            blocks.append((images[p], digits[p]))
            labels.append(f"{name}: {pair['from']} to {pair['to']}")
    steps = len(blocks[0][1])
    h, w = blocks[0][0].shape[1:]
    grid = tile(np.concatenate([b[0] for b in blocks]), cols=steps)
    fig, ax = plt.subplots(figsize=(steps * 0.62 + 1.6, len(blocks) * 0.72 + 0.6))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
    for r, (_, digits) in enumerate(blocks):
        for c, digit in enumerate(digits):
            ax.text(2 + c * (w + 2) + w / 2 - 1, 2 + r * (h + 2) + h - 3, digit, color="yellow", fontsize=7,
                    ha="center", va="bottom")
    ax.set_yticks([2 + (h + 2) * r + h / 2 - 1 for r in range(len(blocks))], labels, fontsize=8)
    ax.set_xticks([])
    ax.set_title("Interpolations in each model's latent space (digit: classifier, p >= 0.9; -: none)", fontsize=10)
    return _save(fig, path)


def validity_bars(scores: Mapping[str, float], threshold: float, path: Path,
                  intervals: Mapping[str, tuple[float, float]] | None = None) -> Path:
    """One bar per source; with `intervals`, their 95 % intervals as error bars."""
    names = list(scores)
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.2))
    y = np.arange(len(names))[::-1]
    xerr = None
    if intervals:
        xerr = np.maximum(0.0, [[scores[n] - intervals[n][0] for n in names],
                                [intervals[n][1] - scores[n] for n in names]])
    ax.barh(y, [scores[n] for n in names], color=[color(n.split(":")[0]) for n in names], xerr=xerr,
            error_kw={"elinewidth": 1, "capsize": 3})
    for yi, n in zip(y, names):
        ax.text(min(scores[n] + 0.06, 0.9), yi, f"{scores[n]:.1%}", va="center", fontsize=9)
    ax.set_yticks(y, names)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share assigned to one digit with probability >= {threshold}")
    ax.set_title("Sample validity")
    return _save(fig, path)


def latent_ranges(ranges: Mapping[str, dict], seed: Mapping[str, tuple[float, float]], path: Path) -> Path:
    """Per model the test-set range of each latent dimension and overall, beside the seed's range."""
    rows: list[tuple[str, float, float, str, float]] = []
    for name, r in ranges.items():
        if name in seed:
            rows.append((f"{name} (seed)", *seed[name], color(name), 0.35))
        rows.append((f"{name} (all dims)", r["min"], r["max"], color(name), 1.0))
        for i, d in enumerate(r["dims"]):
            rows.append((f"{name} z{i + 1}", d["min"], d["max"], color(name), 0.6))
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2))
    y = np.arange(len(rows))[::-1]
    for yi, (label, lo, hi, c, alpha) in zip(y, rows):
        ax.plot([lo, hi], [yi, yi], color=c, alpha=alpha, linewidth=6 if "(" in label else 3,
                linestyle=(0, (1, 1)) if "seed" in label else "-", solid_capstyle="butt")
        ax.text(hi, yi, f"  [{lo:.2f}, {hi:.2f}]", va="center", fontsize=8)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    ax.axvline(0, color="gray", linewidth=0.5)
    ax.set_xlabel("latent value (encoder mean) on the test set")
    ax.set_title("Latent ranges")
    ax.margins(x=0.15)
    return _save(fig, path)


def rate_distortion(curves: Sequence[dict], floor: float, path: Path) -> Path:
    """Two panels: test BCE against bits per dimension (where each model comes within 1 nat of its float32
    result, marked) and against total latent bits (the comparison at equal code size), with the floor."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    top = max(c["float_bce"] for c in curves) * 1.6
    finding = []
    for curve in curves:
        c, name = color(curve["model"]), curve["model"]
        for ax, x in ((left, curve["bits_per_dim"]), (right, curve["total_bits"])):
            ax.plot(x, curve["bce"], marker="o", markersize=3.5, color=c, linewidth=1.8,
                    label=f"{name} ({curve['latent_dim']}-d)")
            ax.axhline(curve["float_bce"], color=c, linestyle="--", linewidth=1)
        b = curve["bits_within_1_nat"]
        if b:
            bce = curve["bce"][curve["bits_per_dim"].index(b)]
            left.plot([b], [bce], marker="o", markersize=12, markerfacecolor="none", markeredgewidth=2, color=c)
            finding.append(f"{name} {b}")
    for ax in (left, right):
        ax.axhline(floor, color="black", linestyle=":", linewidth=1.2)
        ax.set_ylim(floor - 10, top)
        ax.set_ylabel("test BCE, nats per image")
        ax.grid(alpha=0.3)
    left.text(16, floor + 2, f"floor {floor:.1f}", ha="right", fontsize=8)
    left.set_xlabel("bits per latent dimension")
    left.set_xticks(range(1, 17))
    left.set_title("Bits per dimension to come within 1 nat of float32 (circled):\n" + ", ".join(finding),
                   fontsize=10)
    right.set_xlabel("total latent bits per image (bits per dimension x dimensions)")
    right.set_xscale("log", base=2)
    right.set_title("At equal code size (dashed: float32; lower is better)", fontsize=10)
    left.legend(fontsize=9, loc="upper right")
    off = sorted({b for c in curves for b, v in zip(c["bits_per_dim"], c["bce"]) if v > top})
    if off:
        fig.text(0.5, -0.02, f"Off the scale (above {top:.0f} nats): {', '.join(map(str, off))} bit(s) per dimension; "
                 "the table below has every value.", ha="center", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def traversal(images: np.ndarray, values: np.ndarray, digits: list[list[str]], title: str, path: Path) -> Path:
    """Rows: latent dimensions; columns: steps of the sweep; under each image the digit the classifier sees."""
    dims, steps = images.shape[:2]
    grid = tile(images.reshape(dims * steps, *images.shape[2:]), cols=steps)
    fig, ax = plt.subplots(figsize=(steps * 0.62 + 1.2, dims * 0.8 + 0.6))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
    h = images.shape[2] + 2
    for d in range(dims):
        for s in range(steps):
            ax.text(2 + s * h + h / 2 - 1, 2 + d * h + h - 3, digits[d][s], color="yellow", fontsize=7,
                    ha="center", va="bottom")
    ax.set_yticks([2 + h * d + h / 2 - 1 for d in range(dims)],
                  [f"z{d + 1}: {values[d, 0]:.1f} .. {values[d, -1]:.1f}" for d in range(dims)], fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
