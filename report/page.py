"""The report page: one static HTML file that shows the figures beside the numbers behind them.

Only the standard library: the page is a template filled from numbers.json, so what it says and what the
JSON holds cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

HEADINGS = (
    "1. Reconstructions",
    "2. PCA of the training latents (the seed's Figure 4)",
    "3. Latent distributions over the training set",
    "4. Random samples and sample validity",
    "5. Latent ranges on the test set",
    "6. Information theory and rate-distortion",
    "7. Latent traversals",
    "8. Interpolations between test digits",
)

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 3px 9px; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.8em 0; }
.note { color: #555; font-size: 14px; } code { background: #f4f4f4; padding: 0 3px; }
table.claims td, table.claims th { text-align: left; vertical-align: top; } table.claims td.rule { color: #555; font-size: 12.5px; }
.verdict { font-weight: 600; white-space: nowrap; } .supported { color: #067647; } .partly { color: #9a6700; }
.not-reproduced { color: #b42318; }
"""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return escape(str(value))


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(numbers: dict, key: str, alt: str) -> str:
    return f'<img src="{escape(numbers["figures"][key])}" alt="{escape(alt)}">'


def pct(value: float) -> str:
    return f"{value:.1%}"


def _rng(lo: float, hi: float) -> str:
    return f"[{lo:.2f}, {hi:.2f}]"


def _header(n: dict) -> str:
    run = n["run"]
    rows = [(m["name"], m["version"], m["kind"], m["latent_dim"], m["epochs"], m["train_images"],
             m["manifest_test_bce"], m["created"]) for m in run["models"].values()]
    return (
        "<h1>aevae report: the seed's figures and claims, measured</h1>"
        f'<p class="note">Generated {escape(run["created"])} from the model repository '
        f'<code>{escape(run["models_dir"])}</code> and MNIST at <code>{escape(run["data"])}</code>; '
        f'{run["test_images"]:,} test images, {run["samples"]:,} samples per source, seed {run["seed"]}, '
        f'{n["timings"]["total"]:.0f} s. Every number on this page comes from this run '
        f'(also in <a href="numbers.json">numbers.json</a>); the seed\'s own numbers appear only where labelled '
        f'as such.</p>'
        + table(("model", "version", "kind", "latent dim", "epochs", "training images", "test BCE (manifest)",
                 "created"), rows))


def _claims(n: dict) -> str:
    rows = "".join(
        f"<tr><td>{escape(c['claim'])}</td><td>{escape(c['seed'])}</td><td>{escape(c['ours'])}</td>"
        f'<td class="verdict {c["verdict"].replace(" ", "-")}">{escape(c["verdict"])}</td>'
        f'<td class="rule">{escape(c["rule"])}</td></tr>' for c in n["claims"])
    return ('<h2 id="claims">The seed\'s claims, measured</h2>'
            '<table class="claims"><tr><th>the seed\'s claim</th><th>the seed\'s number</th><th>ours (this run)</th>'
            f"<th>verdict</th><th>how the verdict is decided</th></tr>{rows}</table>"
            '<p class="note">Shares are given with Wilson 95 % intervals in brackets. The seed\'s ranges come from '
            "the few input images of its figure; ours are given on the same kind of inputs (the explorer's digits "
            "and non-digits) and on the whole test set. The sections below hold the figures and every number.</p>")


def _reconstructions(n: dict) -> str:
    r = n["reconstructions"]
    rows = [(name, r["bce_shown"][name], r["bce_test"][name]) for name in r["bce_test"]]
    return (
        f"<h2>{escape(HEADINGS[0])}</h2>"
        f"<p>{len(r['indices'])} random test digits (labels {', '.join(map(str, r['labels']))}) and each model's "
        "reconstruction from its encoder mean.</p>" + figure(n, "reconstructions", "reconstructions")
        + table(("model", "BCE of the digits shown (nats/image)", "BCE over the test set (nats/image)"), rows)
        + '<p class="note">The VAE decodes its mean here (deterministic), so its BCE is lower than the '
          "manifest's, which decodes one posterior sample.</p>")


def _pca(n: dict) -> str:
    rows = [(name, p["training_latents"], p["points"], *[pct(v) for v in p["explained_variance_ratio"]])
            for name, p in n["pca"].items()]
    return (
        f"<h2>{escape(HEADINGS[1])}</h2><p>The latents of the training set projected onto their first two principal "
        "components (a class-balanced sample from the repository's latent statistics), coloured by digit.</p>"
        + figure(n, "pca", "PCA scatter plots") + table(("model", "training latents", "points shown",
                                                          "variance PC 1", "variance PC 2"), rows))


def _violins(n: dict) -> str:
    rows = [(name, f"z{i + 1}", d["min"], d["median"], d["max"], d["mean"], d["std"])
            for name, dims in n["violins"].items() for i, d in enumerate(dims)]
    return (
        f"<h2>{escape(HEADINGS[2])}</h2><p>The density of each latent dimension over the whole training set, both models "
        "on one scale.</p>" + figure(n, "violins", "violin plots")
        + table(("model", "dim", "min", "median", "max", "mean", "std"), rows))


def _samples(n: dict) -> str:
    s = n["samples"]
    c = s["classifier"]
    rows = [(label, pct(v), f"[{pct(s['shares'][label]['lo'])}, {pct(s['shares'][label]['hi'])}]",
             f"{s['shares'][label]['k']} of {s['shares'][label]['n']}",
             pct(s["validity_without_subspace_check"][label])) for label, v in s["validity"].items()]
    boxes = "; ".join(f"{name}: " + ", ".join(_rng(lo, hi) for lo, hi in zip(b["lo"], b["hi"]))
                      for name, b in s["boxes"].items())
    recipe = c["recipe"]
    return (
        f"<h2>{escape(HEADINGS[3])}</h2><p>Decoded random latents: "
        + (f"the first 64 of the {s['count']:,}" if s["count"] > 64 else f"all {s['count']:,}")
        + " scored per source; a green frame marks each sample counted valid. "
        "<code>N(0, I)</code> is the VAE's prior; <em>uniform in its box</em> draws uniformly from the "
        "model's own training bounding box (per dimension, min to max).</p>"
        + figure(n, "samples", "random samples") + figure(n, "validity", "sample validity")
        + table(("source", f"validity (p >= {s['threshold']})", "95 % interval", "valid", "without the subspace check"),
                rows)
        + f'<p class="note">Validity: the share of images that a digit classifier assigns to one digit with '
          f"probability >= {s['threshold']}. The classifier is trained by the report on the first "
          f"{c['train_images']:,} MNIST training images (pooled to 16 x 16, PCA to {recipe['components']} "
          f"components, an MLP with {recipe['hidden']} hidden units, scikit-learn) and cached; its accuracy on "
          f"the test images used here is {pct(c['test_accuracy'])}. An image whose pooled pixels lie off the "
          f"digits' PCA subspace (residual above {c['max_residual']:.2f}, the "
          f"{recipe['residual_quantile']:.1%} quantile of the training digits) gets no class: a plain "
          "classifier is overconfident far from its data (the last column). Boxes: " + escape(boxes) + ".</p>")


def _ranges(n: dict) -> str:
    r = n["ranges"]
    rows = []
    for name in ("vae", "ae"):
        seed = r["seed"][name]
        rows.append((name, _rng(r[name]["min"], r[name]["max"]), r[name]["max"] - r[name]["min"],
                     _rng(*seed), seed[1] - seed[0]))
    if "ae-2d" in r:
        rows.append(("ae-2d", _rng(r["ae-2d"]["min"], r["ae-2d"]["max"]), r["ae-2d"]["max"] - r["ae-2d"]["min"],
                     "", ""))
    per_dim = [(name, f"z{i + 1}", _rng(d["min"], d["max"])) for name in ("vae", "ae") for i, d in
               enumerate(r[name]["dims"])]
    explorer = ""
    if "explorer_inputs" in r:
        e = r["explorer_inputs"]
        width = {name: e[name]["max"] - e[name]["min"] for name in ("vae", "ae")}
        explorer = (
            f"<p><strong>Two populations.</strong> The seed measured its ranges on the few input images of its figure; "
            f"the table above is ours on {n['run']['test_images']:,} test images. On the same kind of inputs as the "
            f"seed's (the web explorer's {e['count']}: two test digits per class, a question mark, a letter and a "
            f"stick figure) our ranges are VAE {_rng(e['vae']['min'], e['vae']['max'])} and AE "
            f"{_rng(e['ae']['min'], e['ae']['max'])}: the AE's is {width['ae'] / width['vae']:.1f} times as wide "
            f"(the seed's: {(r['seed']['ae'][1] - r['seed']['ae'][0]) / (r['seed']['vae'][1] - r['seed']['vae'][0]):.1f}"
            " times).</p>")
    return (
        f"<h2>{escape(HEADINGS[4])}</h2><p>The range of the encoder means over all dimensions on the test images, beside "
        f"the seed's. The AE's range is {r['width_ratio_ae_over_vae']:.1f} times as wide as the VAE's. The VAE's "
        f"sampled latents (mean + sigma * eps) span {_rng(r['vae_sampled']['min'], r['vae_sampled']['max'])}.</p>"
        + figure(n, "ranges", "latent ranges")
        + table(("model", "range on the test set (this run)", "width", "range (seed, its figure's inputs)",
                 "width (seed)"), rows) + explorer
        + table(("model", "dim", "range"), per_dim))


def _information(n: dict) -> str:
    info = n["information"]
    curves = info["rate_distortion"]
    names = list(curves)
    bits_rows = [(name, f"32 x 32 x 8 = {info['image_bits']:,}", f"{curves[name]['latent_dim']} x 32 = "
                  f"{info['latent_bits'][name]}", f"{info['ratio'][name]:.0f}") for name in names]
    rd_header = ["bits / dim", *[f"{name}: total bits" for name in names], *[f"{name}: BCE" for name in names]]
    rd_rows = []
    for i, b in enumerate(curves[names[0]]["bits_per_dim"]):
        rd_rows.append((b, *[curves[m]["total_bits"][i] for m in names], *[curves[m]["bce"][i] for m in names]))
    rd_rows.append(("float32", *[32 * curves[m]["latent_dim"] for m in names], *[curves[m]["float_bce"] for m in names]))
    within = [(m, curves[m]["float_bce"], curves[m]["bits_within_1_nat"] or "not within 16 bits",
               (curves[m]["bits_within_1_nat"] or 0) * curves[m]["latent_dim"] or "",
               curves[m]["float_bce"] - info["bce_floor"]) for m in names]
    html = (
        f"<h2>{escape(HEADINGS[5])}</h2>"
        + table(("model", "bits per image", "bits in the latent (float32)", "ratio"), bits_rows)
        + f"<p>The BCE floor, the entropy of the grey levels of the test images (the BCE of a perfect "
          f"reconstruction): <strong>{info['bce_floor']:.2f} nats per image</strong>.</p>"
        + figure(n, "rate_distortion", "rate-distortion") + _bits_finding(info)
        + '<p class="note">Each latent dimension is quantized uniformly to 2<sup>b</sup> levels (bin centres) '
          "over its training range (min to max from the latent statistics); test values outside are clipped. "
          "The VAE is evaluated from its quantized <em>mean</em> (deterministic decode, no sampling); so is its "
          "float result here.</p>"
        + table(("model", "float BCE", f"bits/dim within {info['tolerance_nats']:g} nat of float", "total bits",
                 "float BCE above the floor"), within)
        + table(rd_header, rd_rows))
    if "ae2d_vs_vae" in info:
        c = info["ae2d_vs_vae"]
        verdict = "better than" if c["difference"] < 0 else "worse than"
        equal = "; ".join(f"{t} bits: ae-2d {v['ae-2d']:.1f}, vae {v['vae']:.1f}"
                          for t, v in c["at_equal_total_bits"].items())
        html += (f"<p><strong>Two AE latents against four VAE latents:</strong> the 2-d AE reconstructs the test "
                 f"set at {c['ae2d_float_bce']:.2f} nats per image, the 4-d VAE at {c['vae_float_bce']:.2f} "
                 f"(from its mean; {_cell(c['vae_manifest_test_bce'])} with a posterior sample, from its "
                 f"manifest): the "
                 f"2-d AE is {abs(c['difference']):.2f} nats {verdict} the 4-d VAE. At equal total latent bits: "
                 f"{escape(equal)}.</p>")
    return html


def _bits_finding(info: dict) -> str:
    curves = info["rate_distortion"]
    if "ae" not in curves or "vae" not in curves:
        return ""
    a, v = curves["ae"], curves["vae"]
    ba, bv = a["bits_within_1_nat"], v["bits_within_1_nat"]
    better = [b for b, x, y in zip(a["bits_per_dim"], a["bce"], v["bce"]) if x < y]
    if ba and bv and bv < ba:
        order = (f"our VAE needs <em>fewer</em> bits per dimension than our AE to come within "
                 f"{info['tolerance_nats']:g} nat of its float32 result ({bv} against {ba}), which cuts against the "
                 "seed's argument that the VAE's prior limits what its latents can hold")
    elif ba and bv and bv > ba:
        order = f"our VAE needs more bits per dimension than our AE ({bv} against {ba}), as the seed's argument expects"
    else:
        order = f"both need the same number of bits per dimension ({ba})"
    return (f"<p><strong>Bits per dimension:</strong> {order}. At equal bits per dimension the AE reconstructs better "
            f"at {len(better)} of {len(a['bce'])} bit depths; at float32 the AE scores {a['float_bce']:.2f} and the "
            f"VAE {v['float_bce']:.2f} nats per image.</p>")


def _interpolations(n: dict) -> str:
    it = n.get("interpolations")
    if not it:
        return ""
    rows = [(name, f"{x['share']:.1%}", f"[{x['lo']:.1%}, {x['hi']:.1%}]", f"{x['k']} of {x['n']}")
            for name, x in it["shares"].items()]
    return (f"<h2>{escape(HEADINGS[7])}</h2><p>{it['pairs']} random pairs of test digits with different labels; for "
            f"each model a straight line between the two encodings (encoder means) in its own latent space, "
            f"{it['steps']} frames with both ends. Under each frame the digit the classifier assigns with "
            "probability >= 0.9 (\"-\": none). The share counts the in-between frames (ends excluded) that are "
            "valid digits.</p>" + figure(n, "interpolations", "interpolations")
            + table(("model", "valid in-between frames", "95 % interval", "frames"), rows))


def _traversals(n: dict) -> str:
    parts = [f"<h2>{escape(HEADINGS[6])}</h2><p>For each latent dimension a sweep of decoded images across its training "
             "range (min to max), the other dimensions at their median; under each image the digit the classifier "
             "assigns with probability >= 0.9 (\"-\": none).</p>"]
    for name, traversal in n["traversals"].items():
        parts.append(figure(n, f"traversal_{name}", f"traversals of {name}"))
        parts.append(f"<p>{escape(name)}: medians " + ", ".join(f"{v:.2f}" for v in traversal["median"]) + ".</p>")
        rows = [(f"{name} z{d['dim']}", _rng(d["from"], d["to"]), " ".join(d["digits"]),
                 ", ".join(d["distinct_digits"]) or "none", len(d["distinct_digits"])) for d in traversal["sweeps"]]
        parts.append(table(("dimension", "swept range", "digits along the sweep", "distinct digits", "count"), rows))
    return "".join(parts)


def _timings(n: dict) -> str:
    return ('<p class="note">Seconds per part: '
            + ", ".join(f"{escape(k)} {v:.1f}" for k, v in n["timings"].items()) + ".</p>")


def render(numbers: dict) -> str:
    body = "".join(section(numbers) for section in (
        _header, _claims, _reconstructions, _pca, _violins, _samples, _ranges, _information, _traversals,
        _interpolations, _timings))
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>aevae report</title>'
            f"<style>{STYLE}</style></head><body>{body}</body></html>\n")
