"""The web UI in a real headless Chromium, against the real UI server and real encoder and decoder services.

One set of servers and one browser for the module; each test gets a fresh page. Covered: both models on one
shared scale, judged samples, interpolation and cross decoding, selection colours, snapping, the keyboard,
an axe accessibility check, the layout from 1920 down to 390 px, the server's API, and a decoder outage
(stopped and restarted, so that test runs last).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from helpers import ROOT, run_aevae

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
AEVAE = [sys.executable, "-m", "aevae.cli"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make setup)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """One `aevae serve` subprocess that can be stopped and started again on the same port."""

    def __init__(self, kind: str, repo: Path, port: int, log_dir: Path):
        self.kind, self.repo, self.port, self.log_dir = kind, repo, port, log_dir
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_dir / f"{self.kind}.log", "ab")
        self.proc = subprocess.Popen(
            [*AEVAE, "serve", self.kind, "--models-dir", str(self.repo), "--port", str(self.port),
             "--grace", "1", "--shutdown-delay", "0.1"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_serving(self, timeout: float = 90) -> None:
        from aevae.client import DecoderClient, EncoderClient

        cls = EncoderClient if self.kind == "encoder" else DecoderClient
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:
                with cls(self.target, timeout=1.0, retries=0) as client:
                    if client.health() == "SERVING":
                        return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.3)
        raise AssertionError(f"{self.kind} did not start: {self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        path = self.log_dir / f"{self.kind}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def post_json(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@contextlib.contextmanager
def ui_stack(repo: Path, logs: Path, service: type["Service"] | None = None) -> Iterator[dict]:
    """An encoder and a decoder (`service`, default Service) over `repo` and `aevae ui` over both, once the UI
    server sees both up: {"url", "encoder", "decoder", "repo"}; all stopped at the end."""
    kind = service or Service
    encoder = kind("encoder", repo, free_port(), logs)
    decoder = kind("decoder", repo, free_port(), logs)
    encoder.start()
    decoder.start()
    ui_port = free_port()
    ui_log = open(logs / "ui.log", "ab")
    ui = subprocess.Popen([*AEVAE, "ui", "--encoder", encoder.target, "--decoder", decoder.target,
                           "--port", str(ui_port)], stdout=ui_log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        encoder.wait_serving()
        decoder.wait_serving()
        url = f"http://127.0.0.1:{ui_port}"
        deadline = time.monotonic() + 30
        while True:
            assert ui.poll() is None, (logs / "ui.log").read_text()
            try:
                services = get_json(url + "/api/status")["services"]
                if all(s["state"] == "up" for s in services.values()):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the UI server never saw both services up"
            time.sleep(0.2)
        yield {"url": url, "encoder": encoder, "decoder": decoder, "repo": repo}
    finally:
        ui.terminate()
        ui.wait(timeout=10)
        encoder.stop()
        decoder.stop()


@pytest.fixture(scope="module")
def stack(trained_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    with ui_stack(trained_repo, tmp_path_factory.mktemp("ui-logs")) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def opened(browser: Any, url: str) -> Iterator[Any]:
    """The explorer at `url` in a fresh browser context, its plots drawn; at the end, no uncaught page error."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.wait_for_selector("[data-testid=recon-handle]", timeout=20000)
    yield page
    context.close()
    assert not errors, errors


@pytest.fixture
def page(browser, stack):
    with opened(browser, stack["url"]) as page:
        wait_output_painted(page, "vae")
        wait_output_painted(page, "ae")
        yield page



# -- helpers ---------------------------------------------------------------------------------------------
OUTPUT_PIXELS = """(kind) => {
  const c = document.querySelector(`[data-testid=output-${kind}]`);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  return Array.from(d.filter((_, i) => i % 4 === 0));
}"""


def output_pixels(page, kind: str = "vae") -> list[int]:
    return page.evaluate(OUTPUT_PIXELS, kind)


def wait_output_painted(page, kind: str = "vae") -> None:
    page.wait_for_function(f"(kind) => ({OUTPUT_PIXELS})(kind).some(v => v < 250)", arg=kind, timeout=15000)


def wait_output_changes(page, before: list[int], kind: str = "vae") -> list[int]:
    page.wait_for_function(f"([kind, before]) => ({OUTPUT_PIXELS})(kind).some((v, i) => v !== before[i])",
                           arg=[kind, before], timeout=10000)
    return output_pixels(page, kind)


def handles(page, kind: str = "vae"):
    return page.locator(f"[data-testid=model-{kind}] [data-testid=recon-handle]")


def handle_values(page, kind: str = "vae") -> list[float]:
    return [float(v) for v in handles(page, kind).evaluate_all("hs => hs.map(h => h.getAttribute('data-value'))")]


def axes(page, kind: str = "vae") -> list[tuple[float, float]]:
    return [(float(lo), float(hi)) for lo, hi in page.locator(f"[data-testid=model-{kind}] [data-testid=latent-axis]")
            .evaluate_all("as => as.map(a => [a.getAttribute('data-lo'), a.getAttribute('data-hi')])")]


def selected(page) -> list[int]:
    return page.evaluate("() => window.__aevae.state.selected.slice()")


def select_only(page, indices: list[int]) -> None:
    images = page.locator("[data-testid=input-image]")
    for i in selected(page):
        images.nth(i).click()
    for i in indices:
        images.nth(i).click()
    assert selected(page) == indices


def line_colours(page, kind: str = "vae") -> dict[int, str]:
    lines = page.locator(f"[data-testid=model-{kind}] [data-testid=latent-line]")
    return {int(i): c for i, c in lines.evaluate_all("ls => ls.map(l => [l.dataset.input, l.getAttribute('stroke')])")}


def input_latents(page, index: int, kind: str = "vae") -> list[float]:
    return page.evaluate("([i, k]) => window.__aevae.state.inputs[i].latents[k]", [index, kind])


def drag_handle(page, dim: int, dy: float, kind: str = "vae", steps: int = 12) -> None:
    # The plot redraws its handles (new elements, same places) whenever an answer arrives: one found just before
    # a redraw has no box any more, so look again (seen once in CI: bounding_box() gave None).
    deadline = time.monotonic() + 10
    while (box := handles(page, kind).nth(dim).bounding_box()) is None:
        assert time.monotonic() < deadline, f"no visible handle {dim} of {kind} within 10 s"
        page.wait_for_timeout(50)
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x, y + dy, steps=steps)
    page.mouse.up()


def lab(colour: str) -> tuple[float, float, float]:
    """sRGB hex -> CIE L*a*b* (D65)."""
    def linear(c: float) -> float:
        return ((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92

    r, g, b = (linear(int(colour[i:i + 2], 16) / 255) for i in (1, 3, 5))
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883

    def f(t: float) -> float:
        return t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def axe_serious(page) -> list[str]:
    """The axe-core rules that fail with impact serious or critical on the page as it is now."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    return [f"{v['id']} ({v['impact']}): {[n['target'] for n in v['nodes'][:3]]}"
            for v in results.response["violations"] if v["impact"] in ("serious", "critical")]


# -- the page as loaded ----------------------------------------------------------------------------------
def test_page_loads_everything_from_the_services(page, stack):
    manifest = json.loads((stack["repo"] / "vae" / "1" / "manifest.json").read_text())
    d = manifest["latent_dim"]
    assert page.locator("[data-testid=input-image]").count() == 23  # 20 test digits + ?, A, stick figure
    for kind in ("vae", "ae"):
        assert len(axes(page, kind)) == d and handles(page, kind).count() == d
        assert page.locator(f"[data-testid=model-{kind}] path.violin").count() == d
    assert page.locator("[data-testid=service-status]").get_attribute("data-state") == "ok"
    for testid in ("pca-vae", "pca-ae"):  # the scatter plots were drawn (coloured pixels present)
        coloured = page.evaluate("""async (id) => { const img = document.querySelector(`[data-testid=${id}]`);
            await img.decode(); const c = document.createElement('canvas');
            c.width = img.naturalWidth; c.height = img.naturalHeight; c.getContext('2d').drawImage(img, 0, 0);
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && (d[i] !== d[i + 1] || d[i + 1] !== d[i + 2])) n++;
            return n; }""", testid)
        assert coloured > 500, testid
    # the information-theory numbers come from the served metadata: 32 x 32 x 8 bits vs d x 32 bits
    info = page.locator("#info").inner_text()
    bits_image = manifest["image_shape"][0] * manifest["image_shape"][1] * 8
    assert f"{bits_image:,}" in info and f"{d} × 32 = {d * 32}" in info
    assert f"{bits_image // (d * 32)} ×" in info
    assert "selected inputs" in page.locator("#ranges").inner_text()
    # what a code carries, measured: the VAE's test KL in bits (the seed's "one image in 64" was a ratio of bit
    # counts read as a probability, and is gone)
    kl = manifest["metrics"]["test_kl"]
    assert f"{kl:.1f} nats = {kl / math.log(2):.1f} bits" in info and "no noise: up to" in info
    note = page.locator("#info-note").inner_text()
    assert "not one in 64" in note and "could reproduce one image in" not in note


def test_the_first_samples_are_drawn_once_and_the_same_on_every_load(browser, stack):
    """The listing and the decoder coming up both drew at load: two draws (4 POSTs) in half the loads, tallies
    of 32 against 16, and first samples of seed 1 or 2."""
    shown = []
    for _ in range(3):
        with opened(browser, stack["url"]) as fresh:
            fresh.wait_for_function("() => document.querySelectorAll('[data-testid=sample-ae] img[src]').length === 16")
            fresh.wait_for_timeout(1500)  # a second draw, if any, has been asked for by now
            assert fresh.evaluate("() => window.__aevae.state.samples.seed") == 1  # one draw, of seed 1
            tally = fresh.locator("#samples-tally").inner_text()
            assert "VAE" in tally and "of 16" in tally and "of 32" not in tally, tally
            shown.append(fresh.locator("[data-testid=sample-vae] img").first.get_attribute("src"))
    assert len(set(shown)) == 1


def test_black_line_handles_take_touch_drags_and_violins_stay_inside_their_plot(page):
    """A finger on a black-line point scrolled the page (the points' SVG had no touch-action), and the first
    and the last violin ran past the plot's edges, the first over the tick labels."""
    assert page.evaluate("() => getComputedStyle(document.querySelector('.parcoords-top')).touchAction") == "none"
    for kind in ("vae", "ae"):
        inside = page.evaluate("""(kind) => { const m = document.querySelector(`[data-testid=model-${kind}]`);
            const svg = m.querySelector('svg.parcoords').getBoundingClientRect();
            const ticks = [...m.querySelectorAll('text.tick')].map((t) => t.getBoundingClientRect().right);
            return [...m.querySelectorAll('path.violin')].map((v) => { const r = v.getBoundingClientRect();
                return r.left >= Math.max(svg.left, ...ticks) - 0.5 && r.right <= svg.right + 0.5; }); }""", kind)
        assert inside and all(inside), (kind, inside)


def test_both_models_share_one_scale_with_a_legend(page, stack):
    vae, ae = axes(page, "vae"), axes(page, "ae")
    assert len(set(vae + ae)) == 1  # every axis of both plots: the same range
    lo, hi = vae[0]
    for kind in ("vae", "ae"):  # and it holds both training sets
        stats = get_json(f"{stack['url']}/api/stats/{kind}")
        assert lo <= min(d["min"] for d in stats["dims"]) and max(d["max"] for d in stats["dims"]) <= hi
    legend = page.locator(".legend-row").inner_text()
    assert "training set's distribution" in legend and "black line: what the decoder gets" in legend
    ticks = page.locator("[data-testid=model-vae] text.tick").all_inner_texts()
    assert len(ticks) >= 3
    # the PCA plots share their axes too: one extent for both, equal units on x and y
    assert page.locator("#pca-vae").get_attribute("alt") and "same axes" in page.locator(".pca h2").inner_text().lower()


def test_default_view_shows_a_digit_with_its_line_visible(page):
    state = page.evaluate("() => ({sel: window.__aevae.state.selected, labels: window.__aevae.state.inputs.map(i => i.label)})")
    assert [state["labels"][i] for i in state["sel"]] == [3, 7]
    three = state["sel"][0]
    for kind in ("vae", "ae"):  # the black line starts on the 3, whose coloured line stays visible around it
        assert handle_values(page, kind) == pytest.approx(input_latents(page, three, kind), abs=1e-4)
        widths = page.evaluate("""(kind) => { const m = document.querySelector(`[data-testid=model-${kind}]`);
            return [parseFloat(getComputedStyle(m.querySelector('[data-testid=latent-line]')).strokeWidth),
                    parseFloat(getComputedStyle(m.querySelector('.recon')).strokeWidth)]; }""", kind)
        assert widths[0] > widths[1] + 2


# -- selection and snapping ------------------------------------------------------------------------------
def test_selection_colours_are_stable_distinct_and_apart_from_the_digit_colours(page):
    select_only(page, [4, 14])
    colours = line_colours(page)
    assert len(set(colours.values())) == 2 and line_colours(page, "ae") == colours
    images = page.locator("[data-testid=input-image]")
    images.nth(4).click()
    images.nth(9).click()
    images.nth(4).click()  # re-selected: the same colour as before, and 14 keeps its own
    after = line_colours(page)
    assert after[4] == colours[4] and after[14] == colours[14] and len(set(after.values())) == 3
    for i in (0, 1, 2, 3):  # up to six at once, then a message instead of a repeated colour
        images.nth(i).click()
    assert len(selected(page)) == 6 and len(set(line_colours(page).values())) == 6
    images.nth(20).click()
    assert len(selected(page)) == 6 and "At most 6" in page.locator("#inputs-note").inner_text()
    assert images.nth(20).get_attribute("aria-pressed") == "false"
    selection, digits = page.evaluate("""async () => [(await import('/static/js/main.js')).SELECTION_COLOURS,
                                                      (await import('/static/js/pca.js')).DIGIT_COLOURS]""")
    assert min(math.dist(lab(a), lab(b)) for a in selection for b in digits) >= 30
    assert min(math.dist(lab(a), lab(b)) for a, b in itertools.combinations(selection, 2)) >= 30


def test_double_click_snaps_without_changing_the_selection(page):
    select_only(page, [5, 16])  # 16 drawn last: its line is on top where lines cross
    for kind in ("vae", "ae"):
        page.get_by_test_id(f"random-{kind}").click()
    before = output_pixels(page, "ae")
    # on a line of the AE plot, halfway between the first two axes: only the AE's black line snaps
    point = page.evaluate("""() => { const p = document.querySelector('[data-testid=model-ae] [data-testid=latent-line-hit][data-input="16"]');
        const [x0, y0, x1, y1] = p.getAttribute('d').match(/-?[0-9.]+/g).map(Number);
        const svg = p.ownerSVGElement.getBoundingClientRect();
        return [svg.left + (x0 + x1) / 2, svg.top + (y0 + y1) / 2]; }""")
    vae_before = handle_values(page, "vae")
    page.mouse.dblclick(*point)
    assert handle_values(page, "ae") == pytest.approx(input_latents(page, 16, "ae"), abs=1e-4)
    assert handle_values(page, "vae") == vae_before
    wait_output_changes(page, before, "ae")
    colours = line_colours(page)
    # on a thumbnail: both black lines snap to it; selected or not, the selection stays as it was
    for index in (5, 11):
        page.locator("[data-testid=input-image]").nth(index).dblclick()
        for kind in ("vae", "ae"):
            assert handle_values(page, kind) == pytest.approx(input_latents(page, index, kind), abs=1e-4)
        assert selected(page) == [5, 16] and line_colours(page) == colours


def test_random_stays_inside_the_axes(page):
    seen = set()
    for _ in range(10):
        page.get_by_test_id("random-ae").click()
        values = handle_values(page, "ae")
        seen.add(tuple(values))
        for value, (lo, hi) in zip(values, axes(page, "ae")):
            assert lo <= value <= hi
    assert len(seen) > 1


# -- dragging and the keyboard ---------------------------------------------------------------------------
def test_dragging_a_handle_repaints_that_models_output(page):
    before_values, other_before = handle_values(page, "vae"), handle_values(page, "ae")
    before = output_pixels(page, "vae")
    drag_handle(page, 1, 90)
    after_values = handle_values(page, "vae")
    assert after_values[1] < before_values[1] and after_values[0] == before_values[0]  # down: a lower value
    assert handle_values(page, "ae") == other_before
    wait_output_changes(page, before, "vae")
    handle = handles(page, "vae").nth(1)
    assert float(handle.get_attribute("aria-valuenow")) == pytest.approx(after_values[1], abs=0.006)
    assert page.evaluate("() => document.activeElement.dataset.dim") == "1"  # the dragged point has the focus
    page.keyboard.press("ArrowUp")
    assert handle_values(page, "vae")[1] > after_values[1]


def test_everything_works_from_the_keyboard(page):
    first = page.locator("[data-testid=input-image]").nth(0)
    first.focus()
    assert page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle") != "none"  # visible focus
    page.keyboard.press("Space")
    assert first.get_attribute("aria-pressed") == "true" and 0 in selected(page)
    page.keyboard.press("Enter")
    assert first.get_attribute("aria-pressed") == "false" and 0 not in selected(page)
    # a point of the black line is a slider: Tab reaches it, arrows move it, left/right go to the next point
    handle = handles(page, "ae").nth(0)
    assert handle.get_attribute("role") == "slider" and handle.get_attribute("aria-valuetext").startswith("z1 = ")
    handle.focus()
    assert page.evaluate("() => getComputedStyle(document.activeElement).strokeWidth") == "4px"
    start = handle_values(page, "ae")
    page.keyboard.press("Shift+ArrowDown")
    assert handle_values(page, "ae")[0] < start[0]
    page.keyboard.press("End")  # the slider pattern: End the maximum, Home the minimum
    assert handle_values(page, "ae")[0] == pytest.approx(axes(page, "ae")[0][1])
    page.keyboard.press("Home")
    assert handle_values(page, "ae")[0] == pytest.approx(axes(page, "ae")[0][0])
    page.keyboard.press("ArrowRight")
    assert page.evaluate("() => document.activeElement.getAttribute('aria-label')").endswith("z2")
    # snapping to a selected input by keyboard: its Snap button
    three = selected(page)[0]
    page.locator("[data-testid=snap]").first.focus()
    page.keyboard.press("Enter")
    assert handle_values(page, "ae") == pytest.approx(input_latents(page, three, "ae"), abs=1e-4)
    # drawing by keyboard: arrows move the pen, Space lowers it
    pad = page.get_by_test_id("draw-canvas")
    pad.focus()
    page.keyboard.press("Space")
    for key in ["ArrowUp"] * 6 + ["ArrowRight"] * 4:
        page.keyboard.press(key)
    page.get_by_test_id("encode-drawing").focus()
    page.keyboard.press("Enter")
    page.wait_for_function("() => window.__aevae.state.inputs.length === 24 && window.__aevae.state.inputs[23].latents.vae")
    # every canvas and image is labelled
    assert page.locator("canvas:not([aria-label])").count() == 0
    assert page.locator("img:not([alt])").count() == 0


def test_axe_finds_no_serious_or_critical_violations(page):
    page.wait_for_function("() => document.querySelectorAll('[data-testid=sample-vae]').length === 16")
    assert axe_serious(page) == []


def test_layout_fits_from_1920_down_to_390_px(page):
    for width in (1920, 1280, 768, 390):
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_function("(w) => document.documentElement.clientWidth === w", arg=width)
        page.wait_for_function("() => document.getElementById('pca-vae').dataset.drawnWidth == "
                               "document.getElementById('pca-vae').clientWidth")  # redrawn, not stretched
        scroll, client = page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert scroll <= client, f"sideways scroll at {width} px"
        overflowing = page.evaluate("""() => [...document.querySelectorAll('header *, main *')]
            .filter(e => e.getClientRects().length && e.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)
            .map(e => e.tagName + '#' + e.id)""")
        assert overflowing == [], (width, overflowing)
        for kind in ("vae", "ae"):  # both plots and their handles are on screen and usable
            box = page.locator(f"#parcoords-{kind}").bounding_box()
            assert box["width"] >= min(300, width - 60)
    assert axe_serious(page) == []  # at 390 px as well


# -- the seed's claims, shown ----------------------------------------------------------------------------
def test_samples_are_judged_by_the_reports_classifier(page, stack):
    page.wait_for_function("() => document.querySelectorAll('[data-testid=sample-ae]').length === 16")
    for kind in ("vae", "ae"):
        marks = page.locator(f"[data-testid=sample-{kind}]").evaluate_all("fs => fs.map(f => f.dataset.valid)")
        assert len(marks) == 16 and set(marks) <= {"true", "false"}
        valid = marks.count("true")
        assert f"{valid} of 16 valid" in page.locator(f"#share-{kind}").inner_text()
    first = page.locator("[data-testid=sample-vae] img").first.get_attribute("src")
    page.get_by_test_id("redraw-samples").click()
    page.wait_for_function("(src) => document.querySelector('[data-testid=sample-vae] img').getAttribute('src') !== src", arg=first)
    page.wait_for_function("() => /of 32 \\(/.test(document.getElementById('samples-tally').textContent)")
    tally = page.locator("#samples-tally").inner_text()
    valid = int(tally.split("VAE ")[1].split(" of")[0])
    lo, hi = wilson(valid, 32)
    assert f"95 % interval {round(100 * lo)}–{round(100 * hi)} %" in tally


def test_sample_verdicts_are_the_report_classifiers(stack):
    """The server's verdicts equal the report's classifier applied in-process to the same decoded images."""
    import numpy as np

    from aevae.client import DecoderClient
    from aevae.report.classifier import CONFIDENCE, RECIPE, DigitClassifier
    from aevae.ui.validity import DEFAULT_PATH

    classifier = DigitClassifier.load(DEFAULT_PATH)
    assert classifier.info["recipe"] == RECIPE  # re-export (tools/export_classifier.py) when the recipe changes
    status, reply = post_json(stack["url"] + "/api/samples", {"model": "ae", "count": 24, "seed": 7})
    assert status == 200 and reply["unjudged"] == ""
    assert post_json(stack["url"] + "/api/samples", {"model": "ae", "count": 24, "seed": 7})[1] == reply
    latents = np.asarray(reply["latents"], dtype=np.float32)
    assert latents.shape == (24, 4)
    np.testing.assert_array_equal(latents, np.random.default_rng(7).standard_normal((24, 4)).astype(np.float32))
    with DecoderClient(stack["decoder"].target) as decoder:
        images = decoder.decode(latents, model="ae")
    probabilities = classifier.probabilities(images)
    assert reply["verdicts"]["valid"] == (probabilities.max(axis=1) >= CONFIDENCE).tolist()
    assert reply["verdicts"]["confidence"] == pytest.approx(probabilities.max(axis=1).tolist(), abs=1e-4)
    shown = np.frombuffer(base64.b64decode(reply["images"][0]), np.uint8).reshape(reply["shape"])
    np.testing.assert_array_equal(shown, np.rint(images[0] * 255).astype(np.uint8))


def test_the_page_keeps_its_decodes_in_flight_under_the_socket_s_bound(page):
    """The server answers a decode past its bound per socket (max_decodes, sent in the status message) with
    RESOURCE_EXHAUSTED, which left the image stale. A burst of slider moves sends the main and interpolation
    channels of both models at once (six requests without a shared bound): the page keeps at most the
    server's bound in flight, and every image still arrives."""
    select_only(page, [0, 14])
    page.evaluate("""() => {
        const link = window.__aevae.link, send = link.ws.send.bind(link.ws);
        window.__maxInflight = 0;
        link.ws.send = (data) => { send(data); window.__maxInflight = Math.max(window.__maxInflight, link.inflight()); };
    }""")
    before = output_pixels(page, "ae")
    page.evaluate("""() => {
        const slider = document.querySelector('[data-testid=interpolate]');
        for (const value of [100, 300, 500, 700, 900, 600]) {
            slider.value = String(value);
            slider.dispatchEvent(new Event('input', { bubbles: true }));
        }
    }""")
    wait_output_changes(page, before, "ae")
    assert page.evaluate("window.__aevae.link.socketLimit") == 4  # the server's MAX_DECODES
    assert 2 <= page.evaluate("window.__maxInflight") <= 4
    page.wait_for_function("() => window.__aevae.link.inflight() === 0", timeout=10000)
    assert not page.locator("#note-ae").inner_text().endswith("showing the last image")


def test_interpolation_moves_both_models_between_the_same_two_inputs(page):
    select_only(page, [0, 14])
    slider = page.get_by_test_id("interpolate")
    assert slider.is_enabled()
    before = output_pixels(page, "ae")
    slider.fill("500")
    for kind in ("vae", "ae"):
        a, b = input_latents(page, 0, kind), input_latents(page, 14, kind)
        assert handle_values(page, kind) == pytest.approx([(x + y) / 2 for x, y in zip(a, b)], abs=1e-3)
    wait_output_changes(page, before, "ae")
    for kind in ("vae", "ae"):
        page.wait_for_function(f"() => [...document.querySelectorAll('#interp-{kind} img')].filter(i => i.src).length === 9")
    assert "digit 0" in page.locator("#interp-from").inner_text() and "digit 7" in page.locator("#interp-to").inner_text()
    page.wait_for_function("() => document.querySelectorAll('#traversal img').length === 11")


def test_cross_decoding_shows_each_models_latents_in_both_decoders(page):
    for testid in ("cross-vae-ae", "cross-ae-vae"):
        page.wait_for_function(f"() => !!document.querySelector('[data-testid={testid}]').getAttribute('src')")
    note = page.locator("#cross-note").inner_text()
    assert "trained separately" in note and "other decoder" in note


GRID_CELL = """([testid, row, column, width, height, gap]) => {
  const img = document.querySelector(`[data-testid=${testid}]`);
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const top = gap + row * (height + gap), left = gap + column * (width + gap);
  const grab = (x, y, w, h) => Array.from(ctx.getImageData(x, y, w, h).data.filter((_, i) => i % 4 === 0));
  return {cell: grab(left, top, width, height), frame: grab(left - gap, top - gap, width + 2 * gap, gap)};
}"""


def test_latent_grids_decode_two_dimensions_around_each_black_line(page, stack):
    from aevae.client import DecoderClient

    steps, gap = 9, 2
    for kind in ("vae", "ae"):
        page.wait_for_function(f"() => !!document.querySelector('[data-testid=grid-{kind}]').getAttribute('src')")
    with DecoderClient(stack["decoder"].target) as decoder:
        for kind in ("vae", "ae"):
            z, version = page.evaluate(f"() => [window.__aevae.state.z.{kind}.slice(), "
                                       f"window.__aevae.state.models.{kind}.info.version]")
            height, width = {m.name: m for m in decoder.list_models()}[kind].image_shape
            natural = page.evaluate(f"() => [document.querySelector('[data-testid=grid-{kind}]').naturalWidth, "
                                    f"document.querySelector('[data-testid=grid-{kind}]').naturalHeight]")
            assert natural == [steps * width + (steps + 1) * gap, steps * height + (steps + 1) * gap]
            # the default span is the prior's +-3: the top-left image is z with z1 = -3 and z2 = +3, the bottom-
            # right one z1 = +3, z2 = -3, each as the decoder draws it (the page shows it inverted)
            for row, column, z1, z2 in ((0, 0, -3.0, 3.0), (steps - 1, steps - 1, 3.0, -3.0)):
                corner = [z1, z2, *z[2:]]
                expected = decoder.decode([corner], model=kind, version=version, dtype="uint8")[0].ravel()
                shown = page.evaluate(GRID_CELL, [f"grid-{kind}", row, column, width, height, gap])["cell"]
                drawn = 255 - np.array(shown, dtype=int)
                assert np.abs(drawn - expected.astype(int)).max() <= 1, (kind, row, column)
    assert "z1 across, -3.0 to 3.0; z2 up, -3.0 to 3.0" in page.locator("#grid-vae-note").inner_text()
    # over the shared axes the black line (on an input, which the axes include) is always inside: the frame is
    # round the image nearest it, and round no other
    before = {kind: page.evaluate(f"() => document.querySelector('[data-testid=grid-{kind}]').src") for kind in ("vae", "ae")}
    page.select_option("#grid-range", "axes")
    for kind in ("vae", "ae"):
        page.wait_for_function(f"(b) => document.querySelector('[data-testid=grid-{kind}]').src !== b", arg=before[kind])
        z = page.evaluate(f"() => window.__aevae.state.z.{kind}.slice()")
        (x_lo, x_hi), (y_lo, y_hi) = axes(page, kind)[:2]
        row = steps - 1 - int(np.argmin(abs(np.linspace(y_lo, y_hi, steps) - z[1])))
        column = int(np.argmin(abs(np.linspace(x_lo, x_hi, steps) - z[0])))
        framed = page.evaluate(GRID_CELL, [f"grid-{kind}", row, column, width, height, gap])["frame"]
        assert max(framed) < 60, (kind, row, column)  # dark on the page
        other = (row + 4) % steps
        unframed = page.evaluate(GRID_CELL, [f"grid-{kind}", other, column, width, height, gap])["frame"]
        assert min(unframed) > 200, (kind, other, column)
    # another dimension up: decoded again, named; picking the dimension across swaps the two
    before = page.evaluate("() => document.querySelector('[data-testid=grid-vae]').src")
    page.select_option("#grid-y", "2")
    page.wait_for_function("(b) => document.querySelector('[data-testid=grid-vae]').src !== b", arg=before)
    assert "z3 up" in page.locator("#grid-vae-note").inner_text()
    page.select_option("#grid-x", "2")
    assert page.evaluate("() => [document.querySelector('#grid-x').value, document.querySelector('#grid-y').value]") == ["2", "0"]
    # each model's own training latents, 1 % to 99 % of them in each dimension (the encoder's statistics)
    page.select_option("#grid-range", "training")
    for kind, name in (("vae", "VAE"), ("ae", "AE")):
        q = page.evaluate(f"() => window.__aevae.state.models.{kind}.stats.dims.map(d => d.quantiles)")
        expected = (f"{name}: z3 across, {q[2]['0.01']:.1f} to {q[2]['0.99']:.1f}; "
                    f"z1 up, {q[0]['0.01']:.1f} to {q[0]['0.99']:.1f}")
        page.wait_for_function("([id, text]) => document.getElementById(id).textContent.startsWith(text)",
                               arg=[f"grid-{kind}-note", expected])


TRAVERSAL_VALUES = "() => [...document.querySelectorAll('#traversal button')].map(b => Number(b.dataset.value))"


def test_traversal_sweeps_the_prior_or_the_axes_and_its_frames_are_the_decoders(page, stack):
    from aevae.client import DecoderClient

    page.wait_for_function("() => document.querySelectorAll('#traversal img[src]').length === 11")
    assert page.evaluate(TRAVERSAL_VALUES) == pytest.approx(np.linspace(-3, 3, 11))  # the default: the prior's +-3
    z, version = page.evaluate("() => [window.__aevae.state.z.vae.slice(), window.__aevae.state.models.vae.info.version]")
    with DecoderClient(stack["decoder"].target) as decoder:
        expected = decoder.decode([[-3.0, *z[1:]], [3.0, *z[1:]]], model="vae", version=version, dtype="uint8")
    for frame, image in ((0, expected[0]), (10, expected[1])):
        shown = page.evaluate("""(i) => {
          const img = document.querySelectorAll('#traversal img')[i];
          const c = document.createElement('canvas');
          c.width = img.naturalWidth; c.height = img.naturalHeight;
          c.getContext('2d').drawImage(img, 0, 0);
          return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((_, k) => k % 4 === 0));
        }""", frame)
        assert np.abs(255 - np.array(shown) - image.ravel().astype(int)).max() <= 1, frame
    page.select_option("#traverse-range", "axes")
    lo, hi = axes(page, "vae")[0]
    page.wait_for_function(f"() => ({TRAVERSAL_VALUES})()[0] === {lo}")
    assert page.evaluate(TRAVERSAL_VALUES) == pytest.approx(np.linspace(lo, hi, 11))
    # the frame nearest the black line is marked; the black line is on an input, inside the axes
    current = page.locator("#traversal button.current")
    assert current.count() == 1
    assert float(current.get_attribute("data-value")) == pytest.approx(
        np.linspace(lo, hi, 11)[np.argmin(abs(np.linspace(lo, hi, 11) - z[0]))])


def test_posterior_spread_of_the_selected_inputs_is_the_encoders(page, stack):
    from aevae.client import EncoderClient

    page.wait_for_function("() => /posterior sd, selected\\t\\[/.test(document.querySelector('#ranges').innerText)")
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in page.locator("#ranges").inner_text().splitlines()}
    chosen, version = page.evaluate("() => [window.__aevae.state.selected.map(i => window.__aevae.state.inputs[i].pixels"
                                    ".reduce((s, b) => s + String.fromCharCode(b), '')), "
                                    "window.__aevae.state.models.vae.info.version]")
    images = np.stack([np.frombuffer(text.encode("latin-1"), np.uint8).reshape(28, 28) for text in chosen])
    with EncoderClient(stack["encoder"].target) as encoder:
        sd = np.exp(0.5 * encoder.encode(images, model="vae", version=version).logvar)
    assert rows["posterior sd, selected"] == [f"[{sd.min():.2f}, {sd.max():.2f}]", "none: a point"]


def test_drawing_a_digit_encodes_it(page):
    canvas = page.get_by_test_id("draw-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    x0, y0 = box["x"], box["y"]
    page.mouse.move(x0 + 70, y0 + 40)
    page.mouse.down()
    for x, y in ((130, 40), (130, 100), (70, 100), (70, 160), (130, 160)):  # a "2"-ish stroke
        page.mouse.move(x0 + x, y0 + y, steps=6)
    page.mouse.up()
    before = output_pixels(page)
    page.get_by_test_id("encode-drawing").click()
    images = page.locator("[data-testid=input-image]")
    images.nth(23).wait_for()
    page.wait_for_function("() => window.__aevae.state.inputs[23].latents.vae && window.__aevae.state.inputs[23].latents.ae")
    assert handle_values(page) == pytest.approx(input_latents(page, 23), abs=1e-4)  # snapped to the drawing
    assert 23 in line_colours(page)
    wait_output_changes(page, before)


# -- the server ------------------------------------------------------------------------------------------
def test_ui_server_api_rejects_bad_requests_clearly(stack):
    url = stack["url"]
    status, body = post_json(url + "/api/encode", {"model": "vae", "shape": [28], "images": []})
    assert status == 400 and "shape" in body["error"]
    status, body = post_json(url + "/api/encode", {"model": "vae", "shape": [28, 28], "images": ["AAAA"]})
    assert status == 400 and "784" in body["error"]
    status, body = post_json(url + "/api/encode",
                             {"model": "nope", "shape": [28, 28], "images": [base64.b64encode(bytes(784)).decode()]})
    assert status == 404 and "nope" in body["error"] and body.get("code") == "NOT_FOUND"
    # a shape the model does not take: the encoder says so (the UI server assumes no image size)
    status, body = post_json(url + "/api/encode",
                             {"model": "vae", "shape": [5, 7], "images": [base64.b64encode(bytes(35)).decode()]})
    assert status == 400 and body.get("code") == "INVALID_ARGUMENT" and body["service"] == "encoder"
    status, body = post_json(url + "/api/samples", {"model": "vae", "count": 65})
    assert status == 400 and "'count' must be an integer in 1..64" in body["error"]
    status, body = post_json(url + "/api/samples", {"model": "nope"})
    assert status == 404 and "nope" in body["error"] and body.get("code") == "NOT_FOUND"
    assert get_json(url + "/api/models")["classifier"]["available"] is True


def test_cli_rejects_a_bad_address():
    done = run_aevae("ui", "--encoder", "nowhere", timeout=60)
    assert done.returncode == 2
    assert "--encoder must be HOST:PORT" in done.stderr


def test_decoder_outage_is_shown_and_recovers(page, stack):
    status = page.get_by_test_id("service-status")
    decoder = stack["decoder"]
    decoder.stop()
    try:
        page.wait_for_function(
            "() => { const s = document.querySelector('[data-testid=service-status]');"
            " return s.dataset.state === 'degraded' && /decoder unavailable/i.test(s.textContent); }", timeout=15000)
        # every panel that needs the decoder is dimmed and says so; the encoder's are not
        needs = page.locator("[data-needs=decoder]")
        assert needs.count() >= 5
        assert needs.evaluate_all("ps => ps.every(p => /decoder unavailable/.test(p.dataset.down || ''))")
        assert page.locator("[data-needs=encoder][data-down]").count() == 0
        # the page keeps working: a handle still moves, the last image stays
        before_values = handle_values(page)
        drag_handle(page, 0, -60)
        assert handle_values(page)[0] != before_values[0]
        page.get_by_test_id("random-vae").click()
    finally:
        decoder.start()
    decoder.wait_serving()
    page.wait_for_function(
        "() => document.querySelector('[data-testid=service-status]').dataset.state === 'ok'", timeout=20000)
    assert "unavailable" not in status.inner_text().lower()
    assert page.locator("[data-down]").count() == 0
    before = output_pixels(page)
    drag_handle(page, 2, 70)
    wait_output_changes(page, before)
