"""Screenshots of every page at a desktop and a phone width, light and dark, for a look.

Against a running dashboard (``streamlit run app.py``), in Debian's headless Chromium::

    python scripts/qa_screenshots.py http://127.0.0.1:8501 --query "?base=...&tuned=..."

(``--expand "RL vs SFT"`` opens the expanders so labelled before each capture.)

Each page is opened by its own URL (with ``--query``, e.g. a shared link's models), waited
on until it is finished (:data:`tests.servers.PAGE_FINISHED`, as tests/test_browser.py
waits: the script run over, no progress bar, no Cancel button, no "Starting the analysis"
line, which a cold server shows between runs before the first bar), then captured whole:
the viewport is stretched to the page's height at the same width, so the layout is the
one a visitor at that width sees. Writes
``<out>/<tag>-<page>-<desk|phone>-<light|dark>.png`` and prints each page's draw time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from tests.servers import CHROMIUM, PAGE_FINISHED  # noqa: E402 - after the path

PAGES = (
    "overview",
    "similarity",
    "intruders",
    "effective_rank",
    "spectrum",
    "subspace",
    "series",
    "rl_measures",
    "mitigate",
    "models",
)
SIZES = {"desk": (1400, 900), "phone": (390, 844)}
IDLE = f"() => {PAGE_FINISHED}"
MAIN_HEIGHT = "() => { const m = document.querySelector('[data-testid=\"stMain\"]'); return m ? m.scrollHeight : 0 }"


def wait_idle(page, timeout_ms: int) -> None:
    """Until the page is finished and still is 0.6 s later (a finished run may start another)."""
    while True:
        page.wait_for_function(IDLE, timeout=timeout_ms)
        page.wait_for_timeout(600)
        if page.evaluate(IDLE):
            return


def expand_all(page, words: list[str]) -> int:
    """Open every closed expander whose label holds one of ``words``; how many were opened."""
    opened = 0
    for word in words:
        for summary in page.locator('[data-testid="stExpander"] details:not([open]) > summary', has_text=word).all():
            summary.click()
            opened += 1
    if opened:
        page.wait_for_timeout(1200)  # the charts inside draw
    return opened


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the dashboard, e.g. http://127.0.0.1:8501")
    parser.add_argument("--query", default="", help="appended to every page URL, e.g. '?base=...&tuned=...'")
    parser.add_argument("--pages", default=",".join(PAGES))
    parser.add_argument("--themes", default="light,dark")
    parser.add_argument("--sizes", default="desk,phone")
    parser.add_argument("--out", type=Path, default=Path("test-artifacts/qa"))
    parser.add_argument("--tag", default="qa")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a page may take")
    parser.add_argument(
        "--expand", default="", help="open the expanders whose label holds any of these (comma-separated) first"
    )
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    timeout_ms = int(args.timeout * 1000)
    times: dict[str, float] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-background-networking"]
        )
        for theme in args.themes.split(","):
            for size in args.sizes.split(","):
                width, height = SIZES[size]
                context = browser.new_context(viewport={"width": width, "height": height}, color_scheme=theme)
                page = context.new_page()
                page.set_default_timeout(timeout_ms)
                for name in args.pages.split(","):
                    start = time.perf_counter()
                    page.goto(f"{args.url}/{name}{args.query}")
                    page.wait_for_selector('[data-testid="stApp"]')
                    page.wait_for_timeout(800)
                    wait_idle(page, timeout_ms)
                    seconds = time.perf_counter() - start
                    if expand_all(page, [w for w in args.expand.split(",") if w]):
                        wait_idle(page, timeout_ms)
                    full = int(page.evaluate(MAIN_HEIGHT))
                    page.set_viewport_size({"width": width, "height": max(height, min(full + 40, 12000))})
                    page.wait_for_timeout(900)  # charts re-lay out to the taller viewport
                    path = args.out / f"{args.tag}-{name}-{size}-{theme}.png"
                    page.screenshot(path=str(path), full_page=True)
                    page.set_viewport_size({"width": width, "height": height})
                    errors = page.locator('[data-testid="stException"], [data-testid="stAlertContentError"]').count()
                    times[f"{name}-{size}-{theme}"] = round(seconds, 1)
                    print(f"{path}  {seconds:.1f} s  errors on page: {errors}", flush=True)
                context.close()
        browser.close()
    print(json.dumps(times))


if __name__ == "__main__":
    main()
