"""Takes the README's screenshot of the main view from a running `aevae ui`, in Debian's headless Chromium.

    python -m aevae.ui.screenshot --url http://127.0.0.1:8080/ --out docs/screenshot.png

Three inputs selected, the black line part way from the 3 to the 7 (the interpolation slider), a digit drawn
on the pad: the state a reader should see first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STROKES = [[(60, 55), (85, 38), (120, 40), (135, 65), (120, 95), (80, 130), (62, 150), (140, 150)]]  # a "2"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080/")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshot.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
        page.goto(args.url)
        page.wait_for_selector("[data-testid=recon-handle]", timeout=30000)
        images = page.locator("[data-testid=input-image]")
        seven = page.evaluate("() => window.__aevae.state.inputs.findIndex(i => i.label === 7)")
        question = page.evaluate("() => window.__aevae.state.inputs.findIndex(i => i.name === 'question mark')")
        images.nth(seven).click()
        images.nth(question).click()
        page.get_by_test_id("interpolate").fill("350")
        page.get_by_test_id("interpolate").dispatch_event("change")
        box = page.get_by_test_id("draw-canvas").bounding_box()
        for stroke in STROKES:
            page.mouse.move(box["x"] + stroke[0][0], box["y"] + stroke[0][1])
            page.mouse.down()
            for x, y in stroke[1:]:
                page.mouse.move(box["x"] + x, box["y"] + y, steps=8)
            page.mouse.up()
        page.mouse.move(5, 5)
        page.wait_for_timeout(1500)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=True)
        browser.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
