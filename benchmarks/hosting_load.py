"""Eight visitors, eight analyses: is the hosted dashboard still responsive? (issue 26).

A fresh ``streamlit run app.py`` on an empty cache folder; eight browser contexts open, at
the same moment, links to eight *different* comparisons (one base, eight fine-tunes:
LoRA adapters and full fine-tunes of a small BERT), so eight analyses are queued or
running. While they run:

- the health endpoint (``/_stcore/health``) is asked every quarter second: its slowest answer;
- a ninth, fresh visitor opens ``/models``: seconds until the page's title is drawn;
- each of the eight pages: seconds from its navigation until its first chart is drawn.

The same eight comparisons through the command line, one after another in one process on
a fresh cache (``python -m analysis report BASE T1 ... T8``), give the reference time.
Targets (issue 26): page within 10 s, health within 2 s, each visitor's results within
1.5x the command line's time. The load average is recorded: the figures mean little on a
machine others are using.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.hosting_load [--processes 0|1] [--jobs N]

``--processes 0`` runs the analyses on threads of the web server's process, as before the
worker pool (``WSE_WORKER_PROCESSES=0``), for a before/after comparison on one machine.
Prints one JSON object; ``tests/test_load.py::test_eight_analyses_leave_the_server_responsive``
runs the same measurement and checks the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import psutil

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
VISITORS = 8
#: Until every visitor's chart is drawn (a server that never answers ends the run).
DEADLINE_S = 600


def build_models(root: Path) -> tuple[Path, list[Path]]:
    """A base and :data:`VISITORS` fine-tunes of it (half LoRA adapters, half full fine-tunes)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests import factories

    base = factories.make_bert(root / "base", seed=0)
    tuned = []
    for i in range(VISITORS):
        if i % 2:
            tuned.append(factories.make_full_finetune(base, root / f"full-{i}", seed=10 + i))
        else:
            tuned.append(factories.make_lora_adapter(base, root / f"lora-{i}", r=4 + i, seed=10 + i, factor_std=0.3))
    return base, tuned


def cli_seconds(base: Path, tuned: list[Path], workdir: Path) -> float:
    """Wall seconds of the command line analysing every fine-tune, one after another, cold."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WSE_CACHE_DIR": str(workdir / "cli-cache")}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "analysis", "report", str(base), *map(str, tuned), "--out", str(workdir / "cli.json"),
         "--quiet"],
        cwd=REPO, env=env, check=True, capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - started


class HealthProbe(threading.Thread):
    """Asks the health endpoint every ``every`` seconds; keeps each answer's latency."""

    def __init__(self, url: str, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.url, self.every, self.latencies, self.stop = url, every, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=60) as response:
                    response.read()
            except OSError:
                pass
            self.latencies.append(time.perf_counter() - started)
            self.stop.wait(self.every)


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds of the server process and of its children (the workers), so far."""
    process = psutil.Process(pid)
    own = sum(process.cpu_times()[:2])
    children = 0.0
    for child in process.children(recursive=True):
        try:
            children += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return own, children


def _browser_cpu_seconds() -> float:
    """CPU seconds of the Chromium processes this benchmark started (the visitors' browsers,
    which on a real host run on the visitors' own machines, not beside the server)."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            if "chrom" in child.name().lower():
                total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


#: Runs in every visitor's page from its first paint: the wall-clock time (ms) at which the
#: page first showed its results (a chart, with no analysis left running: no progress bar, no
#: Cancel button) and at which the Models page showed its title with its script done. Read
#: afterwards, so the times do not depend on how often, or how late, this script looks at a
#: busy browser.
WATCH = """
window.__wse = {};
const look = () => {
  const t = window.__wse;
  const idle = document.querySelector('[data-testid="stApp"][data-test-script-state="notRunning"]')
    && !document.querySelector('[data-testid="stStatusWidget"]');
  const cancel = [...document.querySelectorAll('button')].some(b => b.innerText.trim() === 'Cancel');
  if (t.results === undefined && document.querySelector('.js-plotly-plot .main-svg') && !cancel
      && !document.querySelector('[data-testid="stProgress"]')) t.results = Date.now();
  const title = [...document.querySelectorAll('h1')].some(h => h.innerText.trim() === 'Models');
  if (t.models === undefined && title && idle) t.models = Date.now();
};
new MutationObserver(look).observe(document, {subtree: true, childList: true, attributes: true});
"""


def _visitor_page(browser):
    page = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
    page.add_init_script(WATCH)
    page.set_default_timeout(DEADLINE_S * 1000)
    return page


def _seen(page, what: str) -> float | None:
    """When (seconds since the epoch) the page first showed ``what`` (:data:`WATCH`), if it has."""
    try:
        at = page.evaluate(f"() => window.__wse && window.__wse.{what}")
    except Exception:  # navigating
        return None
    return None if at is None else at / 1000


def _chromium(workdir: Path, nice: int) -> str:
    """Chromium, or a script that starts it ``nice`` steps below this process's priority."""
    if not nice:
        return CHROMIUM
    script = workdir / "chromium-niced"
    script.write_text(f'#!/bin/sh\nexec nice -n {int(nice)} {CHROMIUM} "$@"\n')
    script.chmod(0o755)
    return str(script)


def measure(
    base: Path,
    tuned: list[Path],
    workdir: Path,
    *,
    processes: bool = True,
    jobs: int = 1,
    log: Path | None = None,
    browsers_nice: int = 0,
) -> dict:
    """Run the eight-visitor load on a fresh server; the figures as a dict.

    ``browsers_nice``: run the visitors' Chromium that many steps below the server's CPU
    priority, a stand-in for visitors whose browsers run on their own machines (0: as before).
    """
    from playwright.sync_api import sync_playwright

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.servers import server_pid, streamlit_server

    env = {
        "WSE_CACHE_DIR": str(workdir / "server-cache"),
        "WSE_ALLOW_LOCAL_PATHS": "1",
        "WSE_DEMO_AUTOBUILD": "0",
        "WSE_MAX_JOBS": str(jobs),
        "WSE_MAX_JOBS_PER_VISITOR": str(VISITORS),
        "WSE_WORKER_PROCESSES": "1" if processes else "0",
    }
    figures: dict = {"load_average_before": os.getloadavg(), "processes": processes, "max_jobs": jobs,
                     "browsers_nice": browsers_nice}  # fmt: skip
    with streamlit_server(env, log or workdir / "streamlit.log") as url:
        pid = server_pid(url)
        cpu_before = _cpu_seconds(pid)
        probe = HealthProbe(url)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=_chromium(workdir, browsers_nice),
                args=["--no-sandbox", "--disable-background-networking", "--disable-gpu"],
            )
            pages = [_visitor_page(browser) for _ in tuned]
            fresh = _visitor_page(browser)
            started = time.time()
            probe.start()
            for page, model in zip(pages, tuned, strict=True):
                page.goto(f"{url}/overview?base={quote(str(base))}&tuned={quote(str(model))}", wait_until="commit")
            drawn: dict[int, float] = {}
            fresh_opened = None
            while len(drawn) < len(pages) and time.time() - started < DEADLINE_S:
                if fresh_opened is None and time.time() - started > 5:  # the analyses are under way
                    figures["fresh_visitor_while_unfinished"] = len(pages) - len(drawn)
                    fresh_opened = time.time()
                    fresh.goto(f"{url}/models", wait_until="commit")
                for index, page in enumerate(pages):
                    at = None if index in drawn else _seen(page, "results")
                    if at is not None:
                        drawn[index] = at - started
                time.sleep(0.5)
            if fresh_opened is not None:
                fresh.wait_for_function("() => window.__wse && window.__wse.models", timeout=DEADLINE_S * 1000)
                figures["fresh_visitor_page_s"] = round(_seen(fresh, "models") - fresh_opened, 2)
            probe.stop.set()
            probe.join(70)
            browsers_cpu = _browser_cpu_seconds()
            browser.close()
        cpu_after = _cpu_seconds(pid)
    figures.update(
        visitor_results_s=[round(drawn.get(i, float("nan")), 1) for i in range(len(pages))],
        health_max_s=round(max(probe.latencies, default=float("nan")), 3),
        health_p95_s=round(sorted(probe.latencies)[int(0.95 * (len(probe.latencies) - 1))], 3),
        health_samples=len(probe.latencies),
        server_cpu_s=round(cpu_after[0] - cpu_before[0], 1),
        workers_cpu_s=round(cpu_after[1] - cpu_before[1], 1) if processes else 0.0,
        browsers_cpu_s=round(browsers_cpu, 1),
        load_average_after=os.getloadavg(),
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=1, help="1: worker processes (default); 0: threads")
    parser.add_argument("--jobs", type=int, default=1, help="WSE_MAX_JOBS (default 1)")
    parser.add_argument("--no-cli", action="store_true", help="skip the command-line reference run")
    parser.add_argument("--log", type=Path, help="keep the server's output in this file")
    parser.add_argument(
        "--browsers-nice", type=int, default=0, help="run the visitors' Chromium this many nice steps lower (0: same)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="wse-load-") as tmp:
        workdir = Path(tmp)
        base, tuned = build_models(workdir / "models")
        figures = {} if args.no_cli else {"cli_sequential_s": round(cli_seconds(base, tuned, workdir), 1)}
        figures.update(
            measure(
                base,
                tuned,
                workdir,
                processes=bool(args.processes),
                jobs=args.jobs,
                log=args.log,
                browsers_nice=args.browsers_nice,
            )  # fmt: skip
        )
        if "cli_sequential_s" in figures:
            worst = max(figures["visitor_results_s"])
            figures["slowest_visitor_over_cli"] = round(worst / figures["cli_sequential_s"], 2)
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
