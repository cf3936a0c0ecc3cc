"""The first seconds on a cold server (issue 25, item 2): when does the first chart show?

Starts a fresh server on a cache folder that holds the built demo (and whatever spectra are
cached there), waits for its health endpoint, then opens ``/`` in Chromium and records, from
the navigation: the sidebar's titled page links, the page title, the first status line or
progress bar, and the first drawn chart (and that plus the server's start, as someone who
starts it waits). Each run starts each entry point in turn (``--scripts``: ``serve.py``, which
``run.sh`` starts and which warms up as the server starts, and ``app.py``, warmed up by its
first visitor), so both see the same machine; the load average is recorded with them.

    HF_HUB_OFFLINE=1 WSE_CACHE_DIR=/path/to/cache .venv/bin/python -m benchmarks.first_chart [--runs 3]

``--visit-after S``: the visitor comes S seconds after the server is up (a hosted server's
first visitor rarely comes the instant it starts). ``--processes 0`` runs the analyses on
threads of the server (``WSE_WORKER_PROCESSES=0``).
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


def one_run(cache_dir: str, processes: bool, workdir: Path, script: str = "serve.py", visit_after: float = 0.0) -> dict:
    """Seconds from opening ``/`` on a fresh server to each first sight."""
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(REPO))
    from tests.servers import streamlit_server

    env = {"WSE_CACHE_DIR": cache_dir, "WSE_DEMO_AUTOBUILD": "0", "WSE_WORKER_PROCESSES": "1" if processes else "0"}
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with streamlit_server(env, workdir / "streamlit.log", script=script) as url:
        up = time.perf_counter() - started
        time.sleep(visit_after)  # the first visitor comes this long after the server is up
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
    figures = {"script": script, "visit_after_s": visit_after, "load_1min": round(load, 2), "server_up_s": round(up, 1)}
    figures |= {f"{k}_s": round(v / 1000, 2) for k, v in sorted(marks.items(), key=lambda kv: kv[1])}
    if "chart_s" in figures:  # from the server's start, as someone starting it waits
        figures["chart_from_start_s"] = round(up + visit_after + figures["chart_s"], 2)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1, help="1: worker processes (default); 0: threads")
    parser.add_argument(
        "--scripts", default="serve.py,app.py", help="entry points, each run in turn (serve.py: warmed up at start)"
    )
    parser.add_argument("--visit-after", type=float, default=0.0, help="seconds between server up and the visit")
    args = parser.parse_args(argv)
    cache_dir = os.environ.get("WSE_CACHE_DIR")
    if not cache_dir or not (Path(cache_dir) / "demo").is_dir():
        parser.error("set WSE_CACHE_DIR to a cache folder holding the built demo (python -m analysis demo)")
    scripts = [s.strip() for s in args.scripts.split(",") if s.strip()]
    runs: dict[str, list[dict]] = {script: [] for script in scripts}
    for _ in range(args.runs):  # the entry points alternate, so both see the same machine
        for script in scripts:
            with tempfile.TemporaryDirectory(prefix="wse-first-chart-") as tmp:
                runs[script].append(one_run(cache_dir, bool(args.processes), Path(tmp), script, args.visit_after))
                print(json.dumps(runs[script][-1]), flush=True)
    for script, done in runs.items():
        charts = sorted(r.get("chart_s", float("nan")) for r in done)
        starts = sorted(r.get("chart_from_start_s", float("nan")) for r in done)
        print(json.dumps({"script": script, "processes": bool(args.processes),
                          "first_chart_median_s": charts[len(charts) // 2],
                          "from_start_median_s": starts[len(starts) // 2]}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
