"""The first seconds on a cold server (issue 25, item 2): when does the first chart show?

Starts a fresh ``streamlit run app.py`` on a cache folder that holds the built demo (and
whatever spectra are cached there), waits for its health endpoint, then opens ``/`` in
Chromium and records, from the navigation: the sidebar's titled page links, the page
title, the first status line or progress bar, and the first drawn chart. Several runs,
each on a fresh server; the load average is recorded with them.

    HF_HUB_OFFLINE=1 WSE_CACHE_DIR=/path/to/cache .venv/bin/python -m benchmarks.first_chart [--runs 3]

``--processes 0`` runs the analyses on threads of the server (``WSE_WORKER_PROCESSES=0``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
WATCH = """
window.__t = {t0: performance.now()};
new MutationObserver(() => {
  const t = window.__t, now = performance.now() - t.t0;
  const seen = (name, selector) => { if (t[name] === undefined && document.querySelector(selector)) t[name] = now; };
  seen('links', '[data-testid="stSidebar"] [data-testid="stPageLink-NavLink"]');
  seen('title', '[data-testid="stMain"] h1');
  seen('progress', '[data-testid="stMain"] [data-testid="stProgress"]');
  seen('chart', '.js-plotly-plot .main-svg');
}).observe(document, {subtree: true, childList: true});
"""


def one_run(cache_dir: str, processes: bool, workdir: Path) -> dict:
    """Seconds from opening ``/`` on a fresh server to each first sight."""
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(REPO))
    from tests.servers import streamlit_server

    env = {"WSE_CACHE_DIR": cache_dir, "WSE_DEMO_AUTOBUILD": "0", "WSE_WORKER_PROCESSES": "1" if processes else "0"}
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with streamlit_server(env, workdir / "streamlit.log") as url:
        up = time.perf_counter() - started
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-background-networking"]
            )
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.add_init_script(WATCH)
            page.goto(url, wait_until="commit")
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=120_000)
            marks = page.evaluate("() => window.__t")
            browser.close()
    marks.pop("t0", None)
    return {"load_1min": round(load, 2), "server_up_s": round(up, 1)} | {
        f"{k}_s": round(v / 1000, 2) for k, v in sorted(marks.items(), key=lambda kv: kv[1])
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1, help="1: worker processes (default); 0: threads")
    args = parser.parse_args(argv)
    cache_dir = os.environ.get("WSE_CACHE_DIR")
    if not cache_dir or not (Path(cache_dir) / "demo").is_dir():
        parser.error("set WSE_CACHE_DIR to a cache folder holding the built demo (python -m analysis demo)")
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="wse-first-chart-") as tmp:
            runs.append(one_run(cache_dir, bool(args.processes), Path(tmp)))
            print(json.dumps(runs[-1]), flush=True)
    charts = sorted(r.get("chart_s", float("nan")) for r in runs)
    print(json.dumps({"processes": bool(args.processes), "first_chart_median_s": charts[len(charts) // 2]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
