"""The report's driver: load the models and the data, measure the eight parts, draw, write the page.

Every number comes from this run: the models are the repository's newest `ae` and `vae` (and `ae-2d`), the
data MNIST's test set, the classifier trained here (or cached from an earlier run on the same data).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aevae import mnist
from aevae.inference import LoadedModel
from aevae.output import write_whole
from aevae.report import ae2d, claims, classifier as digit_classifier, figures, information, page, samples
from aevae.report.config import SEED_RANGES, ReportConfig, ReportError
from aevae.report.quantize import BITS, TOLERANCE_NATS, bce_per_image, rate_distortion
from aevae.inference import sample
from aevae.store import ModelStore

FIGURES = "figures"
PAGE = "index.html"
NUMBERS = "numbers.json"


class Progress:
    """One line per step on stdout, with the seconds each part took, kept for the page too."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def say(self, message: str) -> None:
        print(f"[report {time.perf_counter() - self.started:6.1f}s] {message}", flush=True)

    def part(self, key: str, title: str) -> "_Part":
        return _Part(self, key, title)


@dataclass
class _Part:
    progress: Progress
    key: str
    title: str

    def __enter__(self) -> "_Part":
        self.t0 = time.perf_counter()
        self.progress.say(f"{self.title} ...")
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self.t0
        self.progress.seconds[self.key] = round(seconds, 2)
        if exc[0] is None:
            self.progress.say(f"{self.title}: done in {seconds:.1f}s")


def _bounds(stats: dict) -> tuple[list[float], list[float]]:
    return [d["min"] for d in stats["dims"]], [d["max"] for d in stats["dims"]]


def _range(values: np.ndarray) -> dict[str, Any]:
    return {"min": float(values.min()), "max": float(values.max()),
            "dims": [{"min": float(v.min()), "max": float(v.max())} for v in values.T]}


def explorer_inputs() -> tuple[np.ndarray, Path] | None:
    """The web explorer's input images (the seed's kind of inputs: a few digits and a few non-digits), as
    N x 32 x 32 floats; None when the UI package is not there."""
    try:
        import aevae.ui
    except ImportError:
        return None
    path = Path(aevae.ui.__file__).with_name("static") / "inputs.json"
    if not path.is_file():
        return None
    items = json.loads(path.read_text())["items"]
    images = np.stack([np.frombuffer(base64.b64decode(item["pixels"]), np.uint8).reshape(item["shape"])
                       for item in items])
    return mnist.pad(images).astype(np.float32) / 255.0, path


def _model_info(model: LoadedModel) -> dict[str, Any]:
    m = model.manifest
    return {"name": model.name, "version": model.number, "kind": m.kind,
            "latent_dim": model.latent_dim, "path": str(model.version.path if model.version else ""),
            "epochs": m.training.get("epochs"), "train_images": m.data.get("train_images"), "created": m.created,
            "manifest_test_bce": m.metric("test_bce")}


@dataclass
class Written:
    """What this run has made so far: a stopped run says it (the figures drawn, whether they and the page reached
    --out, an ae-2d it trained), so that the user knows what is there and that a rerun finishes it.

    The figures are drawn into `staging`, a hidden folder in --out, and reach --out/figures only with the page,
    once every part is done (`publish`): a rerun that stops leaves the earlier report whole."""

    out: Path
    staging: Path
    figures: list[Path] = field(default_factory=list)  # drawn, in `staging` until published
    published: bool = False  # the figures moved into --out/figures (an earlier page and numbers removed)
    page: set[str] = field(default_factory=set)  # PAGE and NUMBERS, once each is on disk
    trained: str | None = None  # "ae-2d/1" when this run trained it

    def stop_line(self) -> str:
        """One line for stderr: what was finished and where, what was not, what to do."""
        parts = [self._figures_part()]
        if self.trained:
            parts.append(f"{self.trained}, trained by this run, is in the repository and will be reused")
        parts.append(self._page_part())
        return "aevae report: " + "; ".join(parts)

    def _figures_part(self) -> str:
        names = ", ".join(path.name for path in self.figures)
        if self.published:
            return f"stopped: {len(self.figures)} figure(s) written to {self.out / FIGURES} ({names})"
        if not self.figures:
            return "stopped before any figure was drawn"
        return f"stopped: {len(self.figures)} figure(s) drawn ({names}), dropped with the run"

    def _page_part(self) -> str:
        rerun = "rerun `aevae report` to finish"
        if self.page >= {PAGE, NUMBERS}:
            return f"the page is written: {self.out / PAGE}"
        if not self.published:
            return f"the report in {self.out} is as it was (an earlier run's, or none): {rerun}"
        if NUMBERS in self.page:
            return f"{self.out / NUMBERS} written, the page {self.out / PAGE} not: {rerun}"
        return f"the page ({PAGE}, {NUMBERS} in {self.out}) not written: {rerun}"


def publish(written: Written, numbers: str, html: str) -> None:
    """The run's figures, numbers.json and page into --out, over an earlier report's. Its page and numbers go
    first, so that a stop part way never leaves a page beside figures of another run; then the figures, each
    renamed in whole; numbers.json; the page last. The earlier report's figures this run does not draw (a
    2-d comparison left out) go too: its numbers.json names them, and nothing else there is touched."""
    out = written.out
    earlier = _figures_named(out / NUMBERS)
    for name in (PAGE, NUMBERS):
        (out / name).unlink(missing_ok=True)
    (out / FIGURES).mkdir(exist_ok=True)
    written.published = True
    for path in written.figures:
        os.replace(path, out / FIGURES / path.name)
    for name in earlier - {path.name for path in written.figures}:
        (out / FIGURES / name).unlink(missing_ok=True)
    write_whole(out / NUMBERS, lambda tmp: tmp.write_text(numbers))
    written.page.add(NUMBERS)
    write_whole(out / PAGE, lambda tmp: tmp.write_text(html))
    written.page.add(PAGE)


def _figures_named(numbers: Path) -> set[str]:
    """The file names of the figures a report's numbers.json lists (under figures/); none when it is missing or
    unreadable."""
    try:
        listed = json.loads(numbers.read_text()).get("figures", {})
        paths = [Path(value) for value in listed.values()] if isinstance(listed, dict) else []
    except (OSError, ValueError, AttributeError, TypeError):  # no file, no JSON, not a report's numbers
        return set()
    return {path.name for path in paths if path.parent == Path(FIGURES) and path.suffix == ".png"}


def folders_to_make(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, outermost first: what mkdir(parents=True) is
    about to make, and so the only folders a run that stops may take away again (never one the user had)."""
    missing = []
    for path in (folder, *folder.parents):
        if os.path.lexists(path):
            break
        missing.append(path)
    return missing[::-1]


def remove_empty(folders: list[Path]) -> None:
    """Removes `folders` (outermost first, as folders_to_make lists them) that are still empty, innermost first:
    a run stopped before its first figure left an empty figures/ and an --out with nothing of use in it.
    rmdir refuses a folder with anything in it, so a figure, or a file put there meanwhile, keeps its folder
    and every folder above it."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:  # not empty, gone, or not ours to remove: it and its parents stay
            return


def prepare_out(out: Path, staging: Path) -> Path:
    """Creates `out` and the run's `staging` folder in it and proves a file can be written there, before any of
    the minutes of work: an --out that is a file, or a folder that cannot be created or written (/proc/...),
    raises ReportError naming it instead of a traceback from mkdir, or an OSError at the very end that loses
    the run. An earlier report there stays as it is until this run publishes its own."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; the report is a folder (index.html, figures/, numbers.json): "
                          "pass a new or existing folder")
    for name in (PAGE, NUMBERS):
        if (out / name).is_dir():
            raise ReportError(f"--out {out} holds a folder named {name}, where the report writes its {name}: "
                              "pass another --out, or move that folder")
    if (out / FIGURES).exists() and not (out / FIGURES).is_dir():
        raise ReportError(f"--out {out} holds a file named {FIGURES}, where the report writes its figures: pass "
                          "another --out, or move that file")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=staging):
            pass
    except OSError as exc:
        raise ReportError(f"--out {out}: cannot write the report there ({exc.strerror or exc}); pass a folder "
                          "you can write") from None
    return out


def run(config: ReportConfig) -> dict[str, Any]:
    """Writes index.html, figures/*.png and numbers.json into `config.out`; returns the numbers.

    However it ends, the folders it made and left empty go again (an error, a refusal found late, a stop
    before the first figure). Stopped by Ctrl-C or SIGTERM it first says on stderr what it wrote and what
    not, then lets the stop go on: aevae.cli.main turns it into exit status 130 or 143."""
    out = Path(config.out)
    made = folders_to_make(out)
    written = Written(out, out / f".{FIGURES}.partial-{os.getpid()}")
    try:
        prepare_out(out, written.staging)
        return _measure_and_draw(config, written)
    except KeyboardInterrupt:  # Terminated (SIGTERM) is one too
        print(written.stop_line(), file=sys.stderr, flush=True)
        raise
    finally:
        shutil.rmtree(written.staging, ignore_errors=True)  # what was drawn and not published
        remove_empty(made)


def _measure_and_draw(config: ReportConfig, written: Written) -> dict[str, Any]:
    """The report's parts one after another, each figure drawn into `written.staging` and noted there, then
    everything published into `written.out` at once."""
    out, drawn = written.out, written.staging
    progress = Progress()
    rng = np.random.default_rng(config.seed)

    store = ModelStore(config.models_dir, runtime="torch")  # BCE from the logits needs the torch module
    repository = store.repository
    versions = {name: store.get(name) for name in ("ae", "vae")}  # NotFound names what exists
    data = mnist.load(config.data_root)
    test = data.test.floats()[:config.test_limit]
    test_labels = data.test.labels[:config.test_limit]
    progress.say(f"MNIST from {data.source}; evaluating on {len(test):,} test images; models in {repository.root}")

    small = ae2d.find(store)
    unfit = ae2d.unfit(small) if small is not None else None
    if unfit and config.ae2d:  # a 4-d AE written as ae-2d (--latent-dim forgotten) "supported" the claim
        raise ReportError(f"{unfit}; write one with `aevae train --models ae --name {ae2d.NAME} --latent-dim "
                          f"{ae2d.LATENT_DIM}`, or pass --no-ae2d to leave the 2-d comparison out")
    if unfit:
        progress.say(f"{unfit}: the 2-d comparison is left out (--no-ae2d)")
        small = None
    elif small is None and config.ae2d:
        with progress.part("ae2d_training", f"training {ae2d.NAME}"):
            small = ae2d.train(store, versions["ae"], config.data_root, config.ae2d_epochs,
                               config.ae2d_train_limit, config.storage_path)
        written.trained = f"{small.name}/{small.number}"
    elif small is None:
        progress.say(f"{ae2d.NAME} is missing and --no-ae2d was given: the 2-d comparison is left out")
    if small is not None:
        versions[ae2d.NAME] = small

    with progress.part("load", "loading models and encoding the test set"):
        models = versions
        stats = {name: m.latent_stats() for name, m in models.items()}
        for name in ("ae", "vae"):
            if not stats[name].get("pca"):  # the PCA figure is drawn from them (services take them as optional)
                raise ReportError(f"{models[name].name}/{models[name].number}'s latent_stats.json holds no PCA, which "
                                  "the report's PCA figure needs: write the version again with `aevae train`")
        encoded = {name: m.encode(test) for name, m in models.items()}
        means = {name: e[0] for name, e in encoded.items()}
        float_bce = {name: bce_per_image(m, means[name], test) for name, m in models.items()}
        for name, m in models.items():
            progress.say(f"  {name}/{m.number}: {m.manifest.kind}, {m.latent_dim}-d latent, test BCE from the "
                         f"encoder mean {float_bce[name].mean():.2f} nats/image")

    train_count = min(config.classifier_train_limit, len(data.train.images))
    classifier = digit_classifier.load_or_train(
        data.train.images[:train_count].astype(np.float32) / 255.0, data.train.labels[:train_count],
        data.sha256["train-images-idx3-ubyte"], Path(config.cache_dir or digit_classifier.default_cache_dir()),
        seed=config.seed, say=progress.say)

    numbers: dict[str, Any] = {
        "run": {"created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "models_dir": str(repository.root),
                "data": data.source, "test_images": len(test), "seed": config.seed, "samples": config.samples,
                "models": {name: _model_info(m) for name, m in models.items()}},
    }
    fig: dict[str, str] = {}

    def save(key: str, path: Path) -> None:
        fig[key] = f"{FIGURES}/{path.name}"  # where the page finds it once published
        written.figures.append(path)

    # 1. Reconstructions
    with progress.part("reconstructions", "1/8 reconstructions"):
        idx = np.sort(rng.choice(len(test), size=min(config.reconstructions, len(test)), replace=False))
        rows = {name: models[name].decode(means[name][idx]) for name in models}
        save("reconstructions", figures.reconstructions(test[idx], rows, drawn / "reconstructions.png"))
        numbers["reconstructions"] = {
            "indices": idx.tolist(), "labels": test_labels[idx].tolist(),
            "bce_shown": {n: round(float(float_bce[n][idx].mean()), 3) for n in models},
            "bce_test": {n: round(float(float_bce[n].mean()), 3) for n in models},
        }

    # 2. PCA (the seed's Figure 4)
    with progress.part("pca", "2/8 PCA of the training latents"):
        pcas = {n: stats[n]["pca"] for n in ("ae", "vae")}
        save("pca", figures.pca_scatter(
            {n: (np.asarray(p["points"]), np.asarray(p["labels"]), p["explained_variance_ratio"])
             for n, p in pcas.items()}, drawn / "pca.png"))
        numbers["pca"] = {n: {"explained_variance_ratio": [round(v, 4) for v in p["explained_variance_ratio"]],
                              "points": len(p["points"]), "training_latents": stats[n]["count"]}
                          for n, p in pcas.items()}

    # 3. Violins
    with progress.part("violins", "3/8 latent distributions"):
        save("violins", figures.violins({n: stats[n]["dims"] for n in ("ae", "vae")}, drawn / "violins.png"))
        numbers["violins"] = {n: [{k: round(d[k], 4) for k in ("min", "max", "mean", "std")}
                                  | {"median": round(d["quantiles"]["0.5"], 4)} for d in stats[n]["dims"]]
                              for n in ("ae", "vae")}

    # 4. Random samples and their validity
    with progress.part("samples", "4/8 random samples and sample validity"):
        n = config.samples
        sources: dict[str, np.ndarray] = {
            "real test digits": test[np.sort(rng.choice(len(test), size=min(n, len(test)), replace=False))],
            "uniform noise images": samples.uniform_noise_images(n, rng),
        }
        for name, m in models.items():
            sources[f"{name}: N(0, I)"] = m.decode(samples.standard_normal(n, m.latent_dim, rng))
            lo, hi = _bounds(stats[name])
            sources[f"{name}: uniform in its box"] = m.decode(samples.uniform_box(n, lo, hi, rng))
        validity, raw, valid, shares = {}, {}, {}, {}
        for label, images in sources.items():
            valid[label] = digit_classifier.confident(classifier.probabilities(images))
            validity[label] = float(valid[label].mean())
            shares[label] = claims.share(int(valid[label].sum()), len(valid[label]))
            raw[label] = digit_classifier.validity(classifier.probabilities(images, gate=False))
            progress.say(f"  validity of {label}: {claims.fmt_share(shares[label])}")
        shown = ("vae: N(0, I)", "ae: N(0, I)", "ae: uniform in its box", "vae: uniform in its box")
        grids = {label: (sources[label][:64], valid[label][:64]) for label in shown}
        save("samples", figures.sample_grids(grids, drawn / "samples.png"))
        save("validity", figures.validity_bars(validity, digit_classifier.CONFIDENCE, drawn / "validity.png",
                                               {label: (x["lo"], x["hi"]) for label, x in shares.items()}))
        test_probs = classifier.probabilities(test, gate=False)
        numbers["samples"] = {
            "count": n, "threshold": digit_classifier.CONFIDENCE, "validity": validity, "shares": shares,
            "validity_without_subspace_check": raw,
            "grids": {label: {"shown": int(len(grids[label][1])),
                              "valid_indices": np.flatnonzero(grids[label][1]).tolist()} for label in shown},
            "classifier": {**classifier.info, "test_accuracy": float((test_probs.argmax(1) == test_labels).mean()),
                           "max_residual": classifier.max_residual},
            "boxes": {name: dict(zip(("lo", "hi"), _bounds(stats[name]))) for name in models},
        }

    # 5. Latent ranges on the test set
    with progress.part("ranges", "5/8 latent ranges on the test set"):
        ranges = {name: _range(means[name]) for name in ("ae", "vae")}
        mu, logvar = encoded["vae"]
        sampled = sample(mu, logvar, rng)
        save("ranges", figures.latent_ranges(ranges, SEED_RANGES, drawn / "ranges.png"))
        width = {n: r["max"] - r["min"] for n, r in ranges.items()}
        numbers["ranges"] = {**ranges, "vae_sampled": _range(sampled),
                             "seed": {k: list(v) for k, v in SEED_RANGES.items()},
                             "width_ratio_ae_over_vae": width["ae"] / width["vae"]}
        if ae2d.NAME in means:
            numbers["ranges"][ae2d.NAME] = _range(means[ae2d.NAME])
        explorer = explorer_inputs()
        if explorer is not None:  # the seed's ranges come from its figure's few inputs: ours on the same kind
            images, path = explorer
            numbers["ranges"]["explorer_inputs"] = {
                "count": len(images), "source": path.name,
                **{name: _range(models[name].encode(images)[0]) for name in ("ae", "vae")}}

    # 6. Information theory and rate-distortion
    with progress.part("information", "6/8 information theory and rate-distortion"):
        image_bits = information.image_bits(tuple(test.shape[1:]))
        floor = information.bce_floor(test)
        curves = []
        for name, m in models.items():
            lo, hi = _bounds(stats[name])
            curve = rate_distortion(m, means[name], test, lo, hi, BITS, float_bce=float(float_bce[name].mean()))
            curves.append(curve.to_json())
            progress.say(f"  {name}: float BCE {curve.float_bce:.2f}; within {TOLERANCE_NATS:g} nat at "
                         f"{curve.bits_within()} bits/dim; 1 bit {curve.bce[0]:.1f}, 16 bits {curve.bce[-1]:.2f}")
        save("rate_distortion", figures.rate_distortion(curves, floor, drawn / "rate_distortion.png"))
        numbers["information"] = {
            "image_bits": image_bits,
            "latent_bits": {n: information.latent_bits(m.latent_dim) for n, m in models.items()},
            "ratio": {n: image_bits / information.latent_bits(m.latent_dim) for n, m in models.items()},
            "bce_floor": floor, "tolerance_nats": TOLERANCE_NATS,
            "rate_distortion": {c["model"]: c for c in curves},
        }
        if ae2d.NAME in models:
            by = numbers["information"]["rate_distortion"]
            numbers["information"]["ae2d_vs_vae"] = {
                "ae2d_float_bce": by[ae2d.NAME]["float_bce"], "vae_float_bce": by["vae"]["float_bce"],
                "vae_manifest_test_bce": models["vae"].manifest.metric("test_bce"),
                "difference": by[ae2d.NAME]["float_bce"] - by["vae"]["float_bce"],
                "at_equal_total_bits": {
                    str(t): {"ae-2d": a, "vae": v} for t, a in zip(by[ae2d.NAME]["total_bits"], by[ae2d.NAME]["bce"])
                    for tv, v in zip(by["vae"]["total_bits"], by["vae"]["bce"]) if tv == t},
            }

    # 7. Traversals
    with progress.part("traversals", "7/8 latent traversals"):
        steps = config.traversal_steps
        numbers["traversals"] = {}
        for name, m in models.items():
            dims = stats[name]["dims"]
            median = np.array([d["quantiles"]["0.5"] for d in dims], dtype=np.float32)
            values = np.stack([np.linspace(d["min"], d["max"], steps) for d in dims]).astype(np.float32)
            latents = np.repeat(median[None, None, :], m.latent_dim, axis=0).repeat(steps, axis=1)
            for d in range(m.latent_dim):
                latents[d, :, d] = values[d]
            images = m.decode(latents.reshape(-1, m.latent_dim)).reshape(m.latent_dim, steps, *test.shape[1:])
            probs = classifier.probabilities(images.reshape(-1, *test.shape[1:])).reshape(m.latent_dim, steps, 10)
            sure = probs.max(axis=2) >= digit_classifier.CONFIDENCE
            digits = [[str(int(probs[d, s].argmax())) if sure[d, s] else "-" for s in range(steps)]
                      for d in range(m.latent_dim)]
            save(f"traversal_{name}", figures.traversal(
                images, values, digits, f"{name}: each dimension swept over its training range, the others at "
                f"their median (digit: classifier, p >= {digit_classifier.CONFIDENCE})",
                drawn / f"traversal-{name}.png"))
            numbers["traversals"][name] = {"median": median.tolist(), "sweeps": [
                {"dim": d + 1, "from": float(values[d, 0]), "to": float(values[d, -1]), "digits": digits[d],
                 "distinct_digits": sorted({x for x in digits[d] if x != "-"})} for d in range(m.latent_dim)]}

    # 8. Interpolations
    with progress.part("interpolations", "8/8 interpolations between test digits"):
        numbers["interpolations"] = interpolations(models, means, test, test_labels, classifier, config, rng)
        save("interpolations", figures.interpolations(
            numbers["interpolations"].pop("figure"), drawn / "interpolations.png"))

    numbers["claims"] = [c.as_dict() for c in claims.evaluate(numbers)]
    numbers["timings"] = {**progress.seconds, "total": round(time.perf_counter() - progress.started, 1)}
    numbers["figures"] = fig
    text = json.dumps(numbers, indent=1, default=float) + "\n"
    html = page.render(numbers)
    publish(written, text, html)
    progress.say(f"wrote {out / PAGE} ({len(fig)} figures, numbers in {out / NUMBERS})")
    return numbers


def interpolations(models: dict[str, LoadedModel], means: dict[str, np.ndarray], test: np.ndarray,
                   labels: np.ndarray, classifier: digit_classifier.DigitClassifier, config: ReportConfig,
                   rng: np.random.Generator) -> dict[str, Any]:
    """Straight lines between the encodings of random test pairs of different digits, in each model's own
    latent space; every in-between frame (the ends excluded) judged by the classifier."""
    steps, count = config.interpolation_steps, config.interpolation_pairs
    pairs: list[tuple[int, int]] = []
    while len(pairs) < count:
        a, b = (int(i) for i in rng.choice(len(test), size=2, replace=False))
        if labels[a] != labels[b]:
            pairs.append((a, b))
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[None, :, None]
    out: dict[str, Any] = {"pairs": len(pairs), "steps": steps, "shares": {}, "digits": {},
                           "shown": [{"from": int(labels[a]), "to": int(labels[b]), "indices": [a, b]}
                                     for a, b in pairs[:config.interpolation_shown]]}
    figure: dict[str, Any] = {"pairs": out["shown"], "rows": {}}
    for name, m in models.items():
        z = means[name]
        ia, ib = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        latents = (1 - t) * z[ia][:, None, :] + t * z[ib][:, None, :]  # pairs x steps x d
        images = m.decode(latents.reshape(-1, m.latent_dim)).reshape(len(pairs), steps, *test.shape[1:])
        probs = classifier.probabilities(images.reshape(-1, *test.shape[1:])).reshape(len(pairs), steps, 10)
        sure = probs.max(axis=2) >= digit_classifier.CONFIDENCE
        inner = sure[:, 1:-1]
        out["shares"][name] = claims.share(int(inner.sum()), int(inner.size))
        digits = [[str(int(probs[p, s].argmax())) if sure[p, s] else "-" for s in range(steps)]
                  for p in range(config.interpolation_shown)]
        out["digits"][name] = digits
        figure["rows"][name] = (images[:config.interpolation_shown], digits)
    out["figure"] = figure
    return out
