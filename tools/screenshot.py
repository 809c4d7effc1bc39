"""Takes the docs' screenshots of a running `aevae ui` at three widths, in Debian's headless Chromium.

    .venv/bin/python tools/screenshot.py --url http://127.0.0.1:8080/ --out-dir docs

Writes screenshot-1920.png, screenshot-1024.png and screenshot-390.png (the whole page). The state shown: the
default selection (a 3 and a 7), the black lines a third of the way from the 3 to the 7 (the interpolation
slider), a digit drawn on the pad and encoded, the judged samples and the latent grids.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STROKES = [[(60, 55), (85, 38), (120, 40), (135, 65), (120, 95), (80, 130), (62, 150), (140, 150)]]  # a "2"
WIDTHS = (1920, 1024, 390)


def prepare(page) -> None:
    page.wait_for_selector("[data-testid=recon-handle]", timeout=30000)
    page.wait_for_function("() => document.querySelectorAll('[data-testid=sample-ae]').length === 16", timeout=30000)
    page.get_by_test_id("interpolate").fill("350")
    page.get_by_test_id("interpolate").dispatch_event("change")
    canvas = page.get_by_test_id("draw-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    scale = box["width"] / 196
    for stroke in STROKES:
        page.mouse.move(box["x"] + stroke[0][0] * scale, box["y"] + stroke[0][1] * scale)
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x * scale, box["y"] + y * scale, steps=8)
        page.mouse.up()
    page.wait_for_function("() => ['vae', 'ae'].every(k => !!document.getElementById(`grid-${k}`).getAttribute('src'))",
                           timeout=30000)
    page.evaluate("() => window.scrollTo(0, 0)")
    page.mouse.move(5, 5)
    page.wait_for_timeout(1500)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080/")
    parser.add_argument("--out-dir", type=Path, default=Path("docs"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    args.out_dir.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
        for width in WIDTHS:
            page = browser.new_page(viewport={"width": width, "height": 1000}, device_scale_factor=1)
            page.goto(args.url)
            prepare(page)
            out = args.out_dir / f"screenshot-{width}.png"
            page.screenshot(path=str(out), full_page=True)
            page.close()
            print(f"wrote {out}")
        browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
