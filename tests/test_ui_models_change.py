"""The explorer used the way a demanding user would, in a real Chromium against real services over the tiny
models (tests/helpers.py `write_tiny_set`: ae/1, vae/1, and vae8/1 with an 8-d latent and 24 x 20 images):
models that change under an open page, a model of another shape, and what the page says about them.

One repository, one set of servers and one browser for the module. The tests change the repository, in the
order they are written: vae/2 appears; then vae/ goes (the page falls back to vae8, the other model of kind
"vae"); then ae/1 goes and ae/2 comes back.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers import ROOT, write_tiny, write_tiny_set
from test_ui import AEVAE, CHROMIUM, Service, browser, handles, opened, output_pixels, ui_stack  # noqa: F401

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make setup)")

VERSION_WAIT_MS = 20000  # the page looks for new versions every 5 s; the services re-read the repository


class FreshService(Service):
    """A service that re-reads the repository often, so that versions written by a test show up at once."""

    def start(self) -> None:
        log = open(self.log_dir / f"{self.kind}.log", "ab")
        self.proc = subprocess.Popen(
            [*AEVAE, "serve", self.kind, "--models-dir", str(self.repo), "--port", str(self.port),
             "--grace", "1", "--shutdown-delay", "0.1", "--refresh-seconds", "0.2"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("ui-models-change")
    with ui_stack(write_tiny_set(base / "models"), base, FreshService) as running:
        yield running


@pytest.fixture
def page(browser, tiny_stack):
    with opened(browser, tiny_stack["url"]) as page:  # fails on any uncaught page error, whatever changed
        page.wait_for_function("() => window.__aevae.state.samples.shown.vae && window.__aevae.state.samples.shown.ae",
                               timeout=20000)
        yield page


def wait_label(page, kind: str, text: str) -> None:
    page.wait_for_function("([kind, text]) => document.getElementById(`label-${kind}`).textContent.includes(text)",
                           arg=[kind, text], timeout=VERSION_WAIT_MS)


def content_aspect(locator, inset: int) -> float:
    """Width / height of what is drawn inside an image element as the browser shows it: the box around every
    pixel that is not the white page behind it (the tiny models draw grey noise), `inset` px of border and
    rounded corners off."""
    from PIL import Image

    shot = Image.open(io.BytesIO(locator.screenshot())).convert("L")
    shot = shot.crop((inset, inset, shot.width - inset, shot.height - inset))
    box = shot.point(lambda v: 255 if v < 250 else 0).getbbox()
    assert box is not None, "nothing drawn"
    return (box[2] - box[0]) / (box[3] - box[1])


# -- a new version ----------------------------------------------------------------------------------------
def test_samples_follow_the_version_the_page_switches_to(page, tiny_stack):
    """A new version appeared: the page switched its labels, statistics and encodings to it, but kept showing
    the samples decoded by the version before (images and labels must belong together)."""
    assert page.evaluate("() => window.__aevae.state.samples.shown.vae.version") == 1
    ae_samples = page.locator("[data-testid=sample-ae] img").first.get_attribute("src")
    write_tiny(tiny_stack["repo"], "vae", "vae", seed=1)
    wait_label(page, "vae", "vae v2")
    page.wait_for_function("() => window.__aevae.state.samples.shown.vae?.version === 2", timeout=10000)
    assert page.evaluate("() => window.__aevae.state.samples.shown.ae.version") == 1
    # the other model's samples are not drawn again, and the tally counts the new version's draw alone
    assert page.locator("[data-testid=sample-ae] img").first.get_attribute("src") == ae_samples
    assert page.evaluate("() => window.__aevae.state.samples.tally.vae[1]") in (0, 16)  # 0: not judged
    # the black line is the selected input's point in the new version's space, not v1's coordinates
    page.wait_for_function("""() => { const s = window.__aevae.state, z = s.inputs[s.selected[0]].latents.vae;
        return z && s.z.vae && z.every((v, i) => Math.abs(v - s.z.vae[i]) < 1e-6); }""", timeout=10000)


# -- another latent dimension and image shape -------------------------------------------------------------
def test_switching_to_a_model_of_another_shape_leaves_nothing_of_the_old_one(page, tiny_stack):
    """vae/ removed: the page falls back to vae8 (8-d latent, 24 x 20 images). Its images kept being drawn
    square (stretched), its samples stayed the 4-d model's, and the 28 x 28 inputs it cannot encode were
    dropped without a word (and took the AE's interpolation with them); the cross decoding showed broken
    images."""
    shutil.rmtree(tiny_stack["repo"] / "vae")
    wait_label(page, "vae", "vae8 v1")
    assert handles(page, "vae").count() == 8 and handles(page, "ae").count() == 4
    assert page.locator("#traverse-dim option").count() == 8
    page.wait_for_function("() => window.__aevae.state.samples.shown.vae?.model === 'vae8'", timeout=10000)
    assert "not judged" in page.locator("#share-vae").inner_text()
    # why the selected inputs have no line in the VAE's plot: the encoder's own answer, on the page
    page.wait_for_function("() => /cannot encode the inputs/.test(document.getElementById('label-vae').textContent)",
                           timeout=10000)
    assert "24 x 20" in page.locator("#label-vae").inner_text()
    # the AE still interpolates between the two selected inputs
    slider = page.get_by_test_id("interpolate")
    assert slider.is_enabled()
    slider.fill("500")
    page.wait_for_function("() => document.querySelectorAll('#interp-ae img[src]').length === 9")
    # 24 x 20 images keep their aspect: the output, a sample, a traversal frame
    page.wait_for_function("() => document.getElementById('output-vae').width === 20")
    page.wait_for_function("() => document.querySelectorAll('#traversal img[src]').length === 11")
    for locator, inset in ((page.get_by_test_id("output-vae"), 5), (page.locator("[data-testid=sample-vae] img").first, 5),
                           (page.locator("#traversal img").first, 3)):
        aspect = content_aspect(locator, inset)  # the inset trims the small frames' height a little
        assert abs(aspect - 20 / 24) < abs(aspect - 1), (locator, aspect)  # nearer 20 : 24 than square
    # the AE's 4 numbers mean nothing to the 8-d decoder: the cell says so instead of showing a broken image
    cross = page.get_by_test_id("cross-ae-vae")
    page.wait_for_function("() => !document.querySelector('[data-testid=cross-ae-vae]').hasAttribute('src')")
    note = page.locator("[data-testid=cross-ae-vae] + .no-image")
    assert "takes 8 values, not 4" in note.inner_text() and cross.is_hidden()
    # its sliders by keyboard, and the image that ends up shown is that of the slider's last position
    last = handles(page, "vae").nth(7)
    last.focus()
    page.keyboard.press("End")
    for _ in range(5):
        page.keyboard.press("ArrowDown")
    page.wait_for_function("""() => { const s = window.__aevae.state;
        return s.shown.vae && s.shown.vae.z.length === 8 && s.shown.vae.z.every((v, i) => v === s.z.vae[i]); }""")
    assert page.evaluate("() => document.activeElement.getAttribute('aria-label')") == "VAE black line, z8"


# -- a model that goes away -------------------------------------------------------------------------------
def test_a_model_no_longer_served_is_said_so_and_comes_back(page, tiny_stack):
    """ae/1 removed while the page shows it: the page went on naming "ae v1" and offering its sliders, as if
    nothing had happened, until a decode failed."""
    shutil.rmtree(tiny_stack["repo"] / "ae" / "1")
    wait_label(page, "ae", "not served")
    assert handles(page, "ae").count() == 0
    assert "AE: ae v1" not in page.locator("#models-badge").inner_text()
    assert page.locator("[data-testid=sample-ae]").count() == 0
    write_tiny(tiny_stack["repo"], "ae", "ae", seed=3)
    wait_label(page, "ae", "ae v2")
    assert handles(page, "ae").count() == 4
    page.wait_for_function("() => window.__aevae.state.shown.ae && window.__aevae.state.samples.shown.ae?.version === 2",
                           timeout=10000)
    assert any(v < 250 for v in output_pixels(page, "ae"))


# -- a version of another width under a pinned page -------------------------------------------------------
def test_samples_for_a_pinned_version_take_its_width(page, tiny_stack):
    """A 6-d version of ae appeared while the page showed the 4-d one before it: samples asked for the pinned
    version were drawn 6 wide from the newest version's metadata, and the decoder refused them (400) until the
    page caught up. The page now sends the width of the version it shows."""
    from test_ui import post_json

    shown = page.evaluate("() => window.__aevae.state.models.ae.info.version")
    version = write_tiny(tiny_stack["repo"], "ae", "ae", latent_dim=6, seed=4).number
    wait_label(page, "ae", f"ae v{version}")  # the services list the 6-d version as ae's newest
    url = tiny_stack["url"] + "/api/samples"
    status, reply = post_json(url, {"model": "ae", "version": shown, "latent_dim": 4, "count": 3, "seed": 1})
    assert status == 200, reply
    assert reply["version"] == shown and [len(z) for z in reply["latents"]] == [4, 4, 4]
    status, reply = post_json(url, {"model": "ae", "version": shown, "count": 3, "seed": 1})
    assert status == 400, reply  # without the width: the newest's, which the pinned version refuses
    status, reply = post_json(url, {"model": "ae", "version": shown, "latent_dim": 0})
    assert status == 400 and "'latent_dim' must be an integer in 1..1024" in reply["error"], reply
    page.wait_for_function(f"() => window.__aevae.state.samples.shown.ae?.version === {version}", timeout=10000)
    assert len(page.evaluate("() => window.__aevae.state.samples.shown.ae.latents[0]")) == 6


# -- a model with no loadable version ---------------------------------------------------------------------
def test_samples_of_a_model_whose_every_version_is_broken_give_the_decoders_reason(tiny_stack):
    """The listing names such a model (latent_dim 0, for its broken versions): /api/samples answered 400
    "'latent_dim' must be an integer in 1..1024, got 0", about a field the caller never sent."""
    from test_ui import post_json

    (tiny_stack["repo"] / "ghost" / "1").mkdir(parents=True)  # a version folder without a manifest
    url = tiny_stack["url"] + "/api/samples"
    deadline = time.monotonic() + 20
    while True:
        status, reply = post_json(url, {"model": "ghost", "count": 2})
        if status != 404 or time.monotonic() > deadline:  # 404 until the decoder has looked again
            break
        time.sleep(0.3)
    assert status == 400 and reply.get("code") == "FAILED_PRECONDITION", reply
    assert "no loadable version of model 'ghost': version 1:" in reply["error"] and "latent_dim" not in reply["error"]
