"""The web UI in a real headless Chromium, against the real UI server and real encoder and decoder services.

One set of servers and one browser for the module; each test gets a fresh page. The outage test stops and
restarts the decoder, so it runs last.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, run_aevae

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


@pytest.fixture(scope="module")
def stack(trained_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("ui-logs")
    encoder = Service("encoder", trained_repo, free_port(), logs)
    decoder = Service("decoder", trained_repo, free_port(), logs)
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
        yield {"url": url, "encoder": encoder, "decoder": decoder, "repo": trained_repo}
    finally:
        ui.terminate()
        ui.wait(timeout=10)
        encoder.stop()
        decoder.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, stack):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(stack["url"])
    page.wait_for_selector("[data-testid=recon-handle]", timeout=20000)
    wait_output_painted(page)
    yield page
    context.close()
    assert not errors, errors


# -- helpers ---------------------------------------------------------------------------------------------
OUTPUT_PIXELS = """() => {
  const c = document.querySelector('[data-testid=output-image]');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  return Array.from(d.filter((_, i) => i % 4 === 0));
}"""


def output_pixels(page) -> list[int]:
    return page.evaluate(OUTPUT_PIXELS)


def wait_output_painted(page) -> None:
    page.wait_for_function(f"() => ({OUTPUT_PIXELS})().some(v => v < 250)", timeout=15000)


def wait_output_changes(page, before: list[int]) -> list[int]:
    page.wait_for_function(f"(before) => ({OUTPUT_PIXELS})().some((v, i) => v !== before[i])", arg=before,
                           timeout=10000)
    return output_pixels(page)


def handle_values(page) -> list[float]:
    return [float(v) for v in page.locator("[data-testid=recon-handle]").evaluate_all(
        "hs => hs.map(h => h.getAttribute('data-value'))")]


def axes(page) -> list[tuple[float, float]]:
    return [(float(lo), float(hi)) for lo, hi in page.locator("[data-testid=latent-axis]").evaluate_all(
        "as => as.map(a => [a.getAttribute('data-lo'), a.getAttribute('data-hi')])")]


def select_only(page, indices: list[int]) -> None:
    images = page.locator("[data-testid=input-image]")
    for i in page.locator("[data-testid=input-image].selected").evaluate_all("cs => cs.map(c => +c.dataset.index)"):
        images.nth(i).click()
    for i in indices:
        images.nth(i).click()


def input_latents(page, index: int, kind: str = "vae") -> list[float]:
    return page.evaluate("([i, k]) => window.__aevae.state.inputs[i].latents[k]", [index, kind])


def drag_handle(page, dim: int, dy: float, steps: int = 12) -> None:
    box = page.locator("[data-testid=recon-handle]").nth(dim).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x, y + dy, steps=steps)
    page.mouse.up()


# -- tests -----------------------------------------------------------------------------------------------
def test_page_loads_everything_from_the_services(page, stack):
    manifest = json.loads((stack["repo"] / "vae" / "1" / "manifest.json").read_text())
    d = manifest["latent_dim"]
    assert page.locator("[data-testid=input-image]").count() == 23  # 20 test digits + ?, A, stick figure
    assert page.locator("[data-testid=latent-axis]").count() == d
    assert page.locator("[data-testid=recon-handle]").count() == d
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
    ranges = page.locator("#ranges").inner_text()
    assert "selected inputs" in ranges and "[" in ranges
    # the violins are drawn behind each axis
    assert page.locator("#parcoords path.violin:not(.ghost)").count() == d


def test_two_selected_inputs_give_two_lines(page):
    select_only(page, [4, 14])
    lines = page.locator("[data-testid=latent-line]")
    assert lines.count() == 2
    colours = {lines.nth(i).get_attribute("stroke") for i in range(2)}
    assert len(colours) == 2
    assert sorted(int(v) for v in lines.evaluate_all("ls => ls.map(l => l.dataset.input)")) == [4, 14]
    select_only(page, [4])
    assert page.locator("[data-testid=latent-line]").count() == 1


def test_dragging_a_handle_repaints_the_output(page):
    before_values = handle_values(page)
    before = output_pixels(page)
    drag_handle(page, 1, 90)
    after_values = handle_values(page)
    assert after_values[1] < before_values[1]  # dragged down: a lower value
    assert after_values[0] == before_values[0]
    wait_output_changes(page, before)
    # the keyboard moves the selected handle (the one just dragged)
    page.locator("#parcoords").focus()
    page.keyboard.press("ArrowUp")
    assert handle_values(page)[1] > after_values[1]


def test_double_click_on_a_line_snaps_the_reconstruction(page):
    select_only(page, [16])
    page.get_by_test_id("random").click()
    target = input_latents(page, 16)
    assert handle_values(page) != pytest.approx(target, abs=1e-4)
    before = output_pixels(page)
    # halfway between the first two axes, away from the black line's points
    point = page.evaluate("""() => { const p = document.querySelector('[data-testid=latent-line-hit]');
        const [x0, y0, x1, y1] = p.getAttribute('d').match(/-?[0-9.]+/g).map(Number);
        const svg = p.ownerSVGElement.getBoundingClientRect();
        return [svg.left + (x0 + x1) / 2, svg.top + (y0 + y1) / 2]; }""")
    page.mouse.dblclick(*point)
    assert handle_values(page) == pytest.approx(target, abs=1e-4)
    wait_output_changes(page, before)


def test_random_stays_inside_the_axes(page):
    seen = set()
    for _ in range(15):
        page.get_by_test_id("random").click()
        values = handle_values(page)
        seen.add(tuple(values))
        for value, (lo, hi) in zip(values, axes(page)):
            assert lo <= value <= hi
    assert len(seen) > 1  # (the 1-epoch test models have narrow axes, so many samples clip to the ends)


def test_show_ae_switches_lines_violins_and_decoder(page):
    select_only(page, [2, 9])
    vae_axes = axes(page)
    assert page.locator("#parcoords .ghost").count() == 0
    before = output_pixels(page)
    page.get_by_test_id("show-ae").check()
    ae_axes = axes(page)
    assert ae_axes != vae_axes
    assert "AE" in page.locator("#model-label").inner_text() and "VAE" not in page.locator("#model-label").inner_text()
    # the VAE greyed out behind: its violins and its two lines
    assert page.locator("#parcoords path.violin.ghost").count() == len(vae_axes)
    assert page.locator("#parcoords path.input-line.ghost").count() == 2
    assert page.locator("[data-testid=latent-line]").count() == 2  # and the AE's own two lines
    page.wait_for_function("() => document.getElementById('output-note').textContent.startsWith('AE decoder')")
    wait_output_changes(page, before)
    page.get_by_test_id("show-ae").uncheck()
    assert axes(page) == vae_axes
    assert page.locator("#parcoords .ghost").count() == 0


def test_interpolation_slider_moves_between_two_inputs(page):
    select_only(page, [0, 14])
    a, b = input_latents(page, 0), input_latents(page, 14)
    slider = page.get_by_test_id("interpolate")
    assert slider.is_enabled()
    before = output_pixels(page)
    slider.fill("500")
    assert handle_values(page) == pytest.approx([(x + y) / 2 for x, y in zip(a, b)], abs=1e-3)
    wait_output_changes(page, before)
    slider.fill("1000")
    assert handle_values(page) == pytest.approx(b, abs=1e-3)
    page.wait_for_function("() => document.querySelectorAll('#traversal img').length === 11")


def test_drawing_a_digit_encodes_it(page):
    canvas = page.get_by_test_id("draw-canvas")
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
    assert images.count() == 24
    page.wait_for_function("() => window.__aevae.state.inputs[23].latents.vae && window.__aevae.state.inputs[23].latents.ae")
    drawn = input_latents(page, 23)
    assert handle_values(page) == pytest.approx(drawn, abs=1e-4)  # snapped to the drawing
    assert "23" in page.locator("[data-testid=latent-line]").evaluate_all("ls => ls.map(l => l.dataset.input)")
    wait_output_changes(page, before)


def test_ui_server_api_rejects_bad_requests_clearly(stack):
    status, body = post_json(stack["url"] + "/api/encode", {"model": "vae", "shape": [30, 30], "images": []})
    assert status == 400 and "shape" in body["error"]
    status, body = post_json(stack["url"] + "/api/encode", {"model": "vae", "shape": [28, 28], "images": ["AAAA"]})
    assert status == 400 and "784" in body["error"]
    status, body = post_json(stack["url"] + "/api/encode",
                             {"model": "nope", "shape": [28, 28], "images": [base64.b64encode(bytes(784)).decode()]})
    assert status in (400, 404), body
    assert "nope" in body["error"] and body.get("code") == "NOT_FOUND"


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
        # the page keeps working: a handle still moves, the last image stays
        before_values = handle_values(page)
        drag_handle(page, 0, -60)
        assert handle_values(page)[0] != before_values[0]
        page.get_by_test_id("random").click()
    finally:
        decoder.start()
    decoder.wait_serving()
    page.wait_for_function(
        "() => document.querySelector('[data-testid=service-status]').dataset.state === 'ok'", timeout=20000)
    assert "unavailable" not in status.inner_text().lower()
    before = output_pixels(page)
    drag_handle(page, 2, 70)
    wait_output_changes(page, before)
