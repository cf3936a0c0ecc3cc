"""Eight visitors, eight analyses: is the hosted dashboard still responsive? (issue 26).

A fresh server (``streamlit run serve.py``, as ``run.sh`` starts it) on an empty cache
folder; eight browser contexts open, at the same moment, links to eight *different*
comparisons (one base, eight fine-tunes: LoRA adapters and full fine-tunes of a small BERT),
so eight analyses are queued or running. While they run:

- the health endpoint (``/_stcore/health``) is asked every quarter second: its slowest answer;
- a ninth, fresh visitor opens ``/models``: seconds until the page's title is drawn;
- each of the eight visitors' results, three ways: seconds from its page's first run on the
  server (the page asking for the analysis) until the analysis finished there
  (``results_server_s``, queue included: the server's part); from its navigation until then
  (``results_ready_s``: plus its browser loading the page); from its navigation until its
  first chart is drawn in its browser (``results_drawn_s``). Finishing times come from the
  server's log; a page shows a finished analysis at its next poll (2 s at most).

By default the visitors arrive at a server that has been up a while (started, warmed up and
idle: the cache is cold, the process is not), as on a host that has been serving; with
``--visit-at-start`` they arrive as soon as the health endpoint answers, while the server is
still importing and starting its worker (the figures of earlier sessions). With ``--cached``
every comparison is in the server's cache before it starts, so nothing is computed: the
floor that the browsers alone set on this machine.

The same eight comparisons through the command line, one after another in one process on
a fresh cache (``python -m analysis report BASE T1 ... T8``), give the reference time.
Targets (issue 26): page within 10 s, health within 2 s, each visitor's results within
1.5x the command line's time. The load average is recorded: the figures mean little on a
machine others are using.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.hosting_load [--processes 0|1] [--jobs N] \
        [--visit-at-start] [--cached]

``--processes 0`` runs the analyses on threads of the web server's process, as before the
worker pool (``WSE_WORKER_PROCESSES=0``), for a before/after comparison on one machine.
Prints one JSON object; ``tests/test_load.py::test_eight_analyses_leave_the_server_responsive``
runs the same measurement and checks the targets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
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


def cli_seconds(base: Path, tuned: list[Path], workdir: Path, cache: str = "cli-cache") -> float:
    """Wall seconds of the command line analysing every fine-tune, one after another, cold
    (into the cache folder ``workdir / cache``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WSE_CACHE_DIR": str(workdir / cache)}
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


#: Put on the server's ``PYTHONPATH``: its log of warming up, workers and jobs at INFO, each
#: line with its wall-clock time, so that the benchmark knows when the server is ready and
#: when each analysis finished on the server.
JOB_LOG = """import logging
logging.basicConfig(format="%(created).3f %(name)s %(message)s")
for name in ("hosting.jobs", "ui.early"):
    logging.getLogger(name).setLevel(logging.INFO)
"""
DONE = re.compile(r"^(\d+\.\d+) hosting\.jobs job (.+?): done in (\d+\.\d+) s", re.MULTILINE)


def _job_log(workdir: Path) -> dict[str, str]:
    """The environment that makes the server log when each job finished (see :data:`JOB_LOG`)."""
    folder = workdir / "job-log"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(JOB_LOG)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def _jobs_done(log: Path, tuned: list[Path]) -> list[tuple[float, float]]:
    """For each fine-tune, from the server's log: when (seconds since the epoch) its job
    finished, and the seconds from the job's start (its page's first run asking for it) until then."""
    done = {label: (float(at), float(took)) for at, label, took in DONE.findall(log.read_text(errors="replace"))}
    nothing = (math.nan, math.nan)
    return [next((v for label, v in done.items() if label.endswith(model.name)), nothing) for model in tuned]


def _settle(pid: int, log: Path, *, workers: bool, timeout_s: float = 180) -> float:
    """Wait until the server has warmed up (its log: ``ui.early`` done importing the pages'
    modules) and, with ``workers``, its worker process waits for work (asleep on its socket
    three samples running, its imports done); the seconds waited."""
    started = time.time()
    asleep = 0
    while time.time() - started < timeout_s and asleep < 3:
        time.sleep(0.3)
        if " ui.early warmed up in " not in log.read_text(errors="replace"):
            continue
        children = psutil.Process(pid).children(recursive=True)
        try:
            idle = all(c.status() == psutil.STATUS_SLEEPING for c in children) and (children or not workers)
        except psutil.NoSuchProcess:
            idle = False
        asleep = asleep + 1 if idle else 0
    return round(time.time() - started, 1)


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
    at_start: bool = False,
    cached: bool = False,
) -> dict:
    """Run the eight-visitor load on a fresh server; the figures as a dict.

    ``browsers_nice``: run the visitors' Chromium that many steps below the server's CPU
    priority, a stand-in for visitors whose browsers run on their own machines (0: as before).
    ``at_start``: the visitors arrive as soon as the health endpoint answers, not once the
    server has warmed up and is idle.
    ``cached``: the command line fills the server's cache with all eight comparisons before
    the server starts, so that no page computes anything (each reads its comparison from the
    cache in the web process): the visitors' wait is then the server reading and the
    browsers loading and drawing, the floor under any server's figures on this machine.
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
        **_job_log(workdir),
    }
    log = log or workdir / "streamlit.log"
    figures: dict = {"processes": processes, "max_jobs": jobs, "browsers_nice": browsers_nice}
    figures.update(at_start=at_start, cached=cached)
    if cached:
        cli_seconds(base, tuned, workdir, cache="server-cache")
    with streamlit_server(env, log) as url:
        pid = server_pid(url)
        if not at_start:
            figures["waited_for_ready_server_s"] = _settle(pid, log, workers=processes)
        figures["load_average_before"] = os.getloadavg()
        cpu_before = _cpu_seconds(pid)
        probe = HealthProbe(url)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=_chromium(workdir, browsers_nice),
                args=["--no-sandbox", "--disable-background-networking", "--disable-gpu"],
            )
            started, drawn = _visit(browser, url, base, tuned, probe, figures)
            probe.stop.set()
            probe.join(70)
            browsers_cpu = _browser_cpu_seconds()
            browser.close()
        cpu_after = _cpu_seconds(pid)
    done = _jobs_done(log, tuned)
    figures.update(
        results_server_s=[round(took, 1) for _, took in done],
        results_ready_s=[round(at - started, 1) for at, _ in done],
        results_drawn_s=[round(drawn.get(i, math.nan), 1) for i in range(len(tuned))],
        health_max_s=round(max(probe.latencies, default=math.nan), 3),
        health_p95_s=round(sorted(probe.latencies)[int(0.95 * (len(probe.latencies) - 1))], 3),
        health_samples=len(probe.latencies),
        server_cpu_s=round(cpu_after[0] - cpu_before[0], 1),
        workers_cpu_s=round(cpu_after[1] - cpu_before[1], 1) if processes else 0.0,
        browsers_cpu_s=round(browsers_cpu, 1),
        load_average_after=os.getloadavg(),
    )
    return figures


def _visit(browser, url: str, base: Path, tuned: list[Path], probe: HealthProbe, figures: dict):
    """Eight visitors open their links at once, a ninth ``/models`` five seconds later; the
    moment they started and when each of the eight drew its results (seconds after it)."""
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
    return started, drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=1, help="1: worker processes (default); 0: threads")
    parser.add_argument("--jobs", type=int, default=1, help="WSE_MAX_JOBS (default 1)")
    parser.add_argument("--no-cli", action="store_true", help="skip the command-line reference run")
    parser.add_argument("--log", type=Path, help="keep the server's output in this file")
    parser.add_argument(
        "--browsers-nice", type=int, default=0, help="run the visitors' Chromium this many nice steps lower (0: same)"
    )
    parser.add_argument(
        "--visit-at-start", action="store_true", help="visitors arrive as the server starts, not once it is idle"
    )
    parser.add_argument(
        "--cached", action="store_true", help="every comparison cached beforehand: the floor, no page computes"
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
                at_start=args.visit_at_start,
                cached=args.cached,
            )  # fmt: skip
        )
        if "cli_sequential_s" in figures:
            for what in ("server", "ready", "drawn"):
                worst = max(figures[f"results_{what}_s"])
                figures[f"slowest_{what}_over_cli"] = round(worst / figures["cli_sequential_s"], 2)
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
