"""The seed's claims, each beside our measurement and a verdict, decided by a rule stated with it.

Verdicts: "supported", "partly", "not reproduced". Shares carry Wilson 95 % intervals, and a claim about one
share being higher than another is "supported" only when the intervals do not overlap. Everything here reads
numbers.json's dict, so the table and the rest of the page cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

SUPPORTED, PARTLY, NOT_REPRODUCED = "supported", "partly", "not reproduced"
Z95 = 1.959964


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a binomial share (95 % by default); (0, 1) for no trials."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # (rounding: p stays inside)


def share(successes: int, trials: int) -> dict[str, Any]:
    lo, hi = wilson(successes, trials)
    return {"k": int(successes), "n": int(trials), "share": successes / trials if trials else float("nan"),
            "lo": lo, "hi": hi}


def fmt_share(s: dict[str, Any]) -> str:
    return f"{s['share']:.1%} [{s['lo']:.1%}, {s['hi']:.1%}]"


def higher(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Is share a above share b? Supported when the 95 % intervals are apart, partly when only the point
    estimates say so."""
    if a["lo"] > b["hi"]:
        return SUPPORTED
    return PARTLY if a["share"] > b["share"] else NOT_REPRODUCED


@dataclass(frozen=True)
class Claim:
    claim: str  # the seed's claim, in its words or close to them
    seed: str  # the seed's number, or what it shows
    ours: str  # our measurement
    verdict: str
    rule: str  # how the verdict was decided

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _width(r: dict[str, Any]) -> float:
    return r["max"] - r["min"]


def evaluate(n: dict[str, Any]) -> list[Claim]:
    """The claims table from the report's numbers."""
    claims: list[Claim] = []
    ranges, s = n["ranges"], n["samples"]["shares"]

    # 1. the latent ranges, on the seed's kind of inputs (the explorer's few images) and on the test set
    seed_vae, seed_ae = ranges["seed"]["vae"], ranges["seed"]["ae"]
    seed_ratio = (seed_ae[1] - seed_ae[0]) / (seed_vae[1] - seed_vae[0])
    ours = ranges.get("explorer_inputs")
    test_ratio = ranges["width_ratio_ae_over_vae"]
    inputs_ratio = _width(ours["ae"]) / _width(ours["vae"]) if ours else None
    ratio = inputs_ratio if inputs_ratio is not None else test_ratio
    verdict = SUPPORTED if ratio >= seed_ratio / 2 else PARTLY if ratio > 1.2 else NOT_REPRODUCED
    text = (f"on the explorer's {ours['count']} inputs: VAE [{ours['vae']['min']:.2f}, {ours['vae']['max']:.2f}], "
            f"AE [{ours['ae']['min']:.2f}, {ours['ae']['max']:.2f}] ({inputs_ratio:.1f}x as wide); " if ours else "")
    claims.append(Claim(
        "The AE's latent values spread far wider than the VAE's",
        f"on the figure's inputs: VAE [{seed_vae[0]:.2f}, {seed_vae[1]:.2f}], AE [{seed_ae[0]:.2f}, "
        f"{seed_ae[1]:.2f}] ({seed_ratio:.1f}x as wide)",
        text + f"on {n['run']['test_images']:,} test images: VAE [{ranges['vae']['min']:.2f}, "
               f"{ranges['vae']['max']:.2f}], AE [{ranges['ae']['min']:.2f}, {ranges['ae']['max']:.2f}] "
               f"({test_ratio:.1f}x)",
        verdict, f"supported if the AE's range is at least half the seed's ratio ({seed_ratio / 2:.1f}x) as wide as "
                 "the VAE's, partly if wider by more than 1.2x"))

    # 2. sampling N(0, I): the VAE gives valid digits, the AE needs luck
    vae, ae, box = s["vae: N(0, I)"], s["ae: N(0, I)"], s["ae: uniform in its box"]
    verdicts = {higher(vae, ae), higher(vae, box)}
    verdict = SUPPORTED if verdicts == {SUPPORTED} else NOT_REPRODUCED if verdicts == {NOT_REPRODUCED} else PARTLY
    claims.append(Claim(
        "Random samples from N(0, I) give the VAE valid output with a good chance; the AE needs a lot of luck",
        "shown, not measured",
        f"valid: VAE N(0, I) {fmt_share(vae)}; AE N(0, I) {fmt_share(ae)}; AE uniform in its box {fmt_share(box)}",
        verdict, "supported if the VAE's share is above both AE shares with 95 % intervals apart; partly if above "
                 "only in the point estimates or above only one"))

    # 3. reasonable output over a larger part of the range: each model's own box
    vbox = s["vae: uniform in its box"]
    claims.append(Claim(
        "Over the full range in which latent values occur, the VAE produces reasonable output over a larger range",
        "shown, not measured",
        f"valid, uniform in each model's training box: VAE {fmt_share(vbox)}, AE {fmt_share(box)}",
        higher(vbox, box), "supported if the VAE's share is above the AE's with 95 % intervals apart"))

    # 4. interpolations work with both
    interp = n.get("interpolations")
    if interp:
        v, a = interp["shares"]["vae"], interp["shares"]["ae"]
        real = s["real test digits"]
        good = [x["lo"] >= 0.5 for x in (v, a)]
        verdict = SUPPORTED if all(good) else PARTLY if any(good) or max(v["share"], a["share"]) >= 0.5 else NOT_REPRODUCED
        claims.append(Claim(
            "Interpolations between images work quite well with both the VAE and the AE",
            "shown, not measured",
            f"valid in-between frames over {interp['pairs']} test pairs of different digits: VAE {fmt_share(v)}, "
            f"AE {fmt_share(a)} (real test digits: {fmt_share(real)})",
            verdict, "supported if both shares are at least 50 % (lower end of the interval); partly if one is"))

    # 5. one dimension alone gives several digits
    trav = n["traversals"]
    most = {name: max(len(sw["distinct_digits"]) for sw in trav[name]["sweeps"]) for name in ("vae", "ae")}
    verdict = SUPPORTED if min(most.values()) >= 3 else PARTLY if max(most.values()) >= 2 else NOT_REPRODUCED
    claims.append(Claim(
        "Modifying a single dimension generates images of several different digits",
        "shown, not measured",
        f"most distinct digits in one sweep (others at their median): VAE {most['vae']}, AE {most['ae']}",
        verdict, "supported if each model has a sweep with at least 3 distinct digits; partly if one has 2"))

    # 6. two AE latents as good as four VAE latents
    info = n["information"]
    c = info.get("ae2d_vs_vae")
    if c:
        equal = c["at_equal_total_bits"]
        wins = [t for t, v in equal.items() if v["ae-2d"] <= v["vae"]]
        verdict = SUPPORTED if c["difference"] <= 1.0 else PARTLY if wins else NOT_REPRODUCED
        claims.append(Claim(
            "An AE with two latent variables reconstructs as well as the VAE with four",
            "shown, not measured",
            f"test BCE at float32: 2-d AE {c['ae2d_float_bce']:.1f}, 4-d VAE {c['vae_float_bce']:.1f} nats per image; "
            + (f"at equal total latent bits the 2-d AE is better up to {max(int(t) for t in wins)} bits" if wins
               else "the 2-d AE is worse at every equal bit budget"),
            verdict, "supported if the 2-d AE is within 1 nat at float32; partly if it is better at some equal "
                     "total bit budgets"))

    # 7. the AE compresses better; the VAE's prior limits the information in its latents
    rd = info["rate_distortion"]
    if "ae" in rd and "vae" in rd:
        a, v = rd["ae"], rd["vae"]
        better = [b for b, x, y in zip(a["bits_per_dim"], a["bce"], v["bce"]) if x < y]
        verdict = SUPPORTED if len(better) == len(a["bce"]) and a["float_bce"] < v["float_bce"] else \
            PARTLY if better or a["float_bce"] < v["float_bce"] else NOT_REPRODUCED
        claims.append(Claim(
            "A standard AE reaches a far better compression than the VAE, whose prior limits the information "
            "its latents hold",
            "argued, not measured",
            f"test BCE at float32: AE {a['float_bce']:.1f}, VAE {v['float_bce']:.1f}; AE better at "
            f"{len(better)} of {len(a['bce'])} equal bit depths; bits per dimension to come within "
            f"{info['tolerance_nats']:g} nat of float32: AE {a['bits_within_1_nat']}, VAE {v['bits_within_1_nat']}",
            verdict, "supported if the AE reconstructs better at float32 and at every equal bit depth; partly if at "
                     "some"))

    # 8. the arithmetic of the information-theory view
    bits, latent = info["image_bits"], info["latent_bits"]["vae"]
    ratio_ok = bits == 8192 and latent == 128
    claims.append(Claim(
        "A 32 x 32 8-bit image holds 8192 bits, four float32 latents 128: a factor of 64, a compression of ~98.5 %",
        "8192 bits, 128 bits, 64x, 98.5 %",
        f"{bits:,} bits, {latent} bits, {bits / latent:.0f}x, {100 * (1 - latent / bits):.1f} %; the BCE floor "
        f"(entropy of the grey levels) is {info['bce_floor']:.1f} nats per image",
        SUPPORTED if ratio_ok else NOT_REPRODUCED, "the same arithmetic on our models' metadata"))
    return claims
