"""A real Streamlit server for the browser tests: ``streamlit run app.py`` in a subprocess
on a free port, waited on through its health endpoint, stopped afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def server_pid(url: str) -> int:
    """The process that listens on ``url``'s port (the server, whose children are its workers)."""
    import psutil

    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            return conn.pid
    raise AssertionError(f"no process listens on {port}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def streamlit_server(
    env: dict[str, str], log_path: Path, start_timeout_s: float = 60, script: str = "serve.py"
) -> Iterator[str]:
    """The URL of a dashboard started with ``env`` added to this process's environment
    (offline: ``HF_HUB_OFFLINE=1``); its output goes to ``log_path``, whose tail is raised
    if it does not start. ``script``: ``serve.py``, as ``run.sh`` starts it (warmed up at
    start), or ``app.py`` (the same pages, warmed up by the first visitor)."""
    port = free_port()
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **env}
    command = [sys.executable, "-m", "streamlit", "run", script, "--server.headless", "true",
               "--server.port", str(port), "--server.address", "127.0.0.1"]  # fmt: skip
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + start_timeout_s
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                        if response.read() == b"ok":
                            break
                except OSError:
                    pass
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"streamlit did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.3)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:  # pragma: no cover
                process.kill()


#: A page in the browser is finished (a JavaScript expression): Streamlit's script run is
#: over and nothing computes for it: no progress bar, no Cancel button (shown while any of
#: its analyses is queued or running) and no "Starting the analysis of ..." line
#: (ui.views._waiting_line), which a cold server shows between script runs before the first
#: progress bar; and no skeleton, Streamlit's stand-in for a chart or table whose code a
#: fresh browser is still loading. benchmarks/hosting_load.py's WATCH finds the Cancel
#: button the same way.
PAGE_FINISHED = """document.querySelector('[data-testid="stApp"][data-test-script-state="notRunning"]') !== null
  && !document.querySelector('[data-testid="stStatusWidget"]')
  && !document.querySelector('[data-testid="stProgress"]')
  && ![...document.querySelectorAll('button')].some(b => b.innerText.trim() === 'Cancel')
  && !document.body.innerText.includes('Starting the analysis')
  && !document.querySelector('[data-testid="stSkeleton"]')"""

#: Debian's Chromium (never ``playwright install``).
CHROMIUM = "/usr/bin/chromium"


def need_browser():
    """Playwright's ``sync_api``; skips where Debian's Chromium or Playwright is missing.

    At a browser test module's top it skips the module; in a fixture or a test, that test."""
    import pytest

    if not Path(CHROMIUM).exists():  # pragma: no cover - depends on the machine
        pytest.skip(f"no Chromium at {CHROMIUM}", allow_module_level=True)
    return pytest.importorskip("playwright.sync_api")


@contextmanager
def chromium(*extra_args: str) -> Iterator:
    """Headless Chromium driven by Playwright, closed on exit (``extra_args`` after the base flags)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-background-networking", *extra_args]
        )
        yield instance
        instance.close()


class ScriptRuns:
    """The script runs of one page as its server reports them, read off the page's websocket.

    ``PAGE_FINISHED`` alone cannot tell that the run an action asked for is over: a click,
    a choice or an upload only *sends* a rerun request, and until the server's answer comes
    back the page still carries the last run's ``notRunning`` state and its elements (after a
    choice in the uploader nothing else changes at all). Here the page's own messages say it:
    the full (not fragment) rerun requests it sent (``BackMsg.rerun_script``), the full runs
    the server started (``new_session``) and the ones that ended (``script_finished``,
    matched by script run id). :meth:`wait` is over once a run that started after a request
    sent after :meth:`mark` has finished, and the page is finished too.

    Take :meth:`mark` on a settled page, just before the action: a run asked for earlier and
    not yet started would count as the action's. ``timeout_ms``: how long :meth:`wait` waits
    for the run, then for the finished page (each).
    """

    def __init__(self, timeout_ms: float = 120_000) -> None:
        self.timeout_ms = timeout_ms
        self.requested = 0  # full rerun requests sent by the page
        self.started: list[tuple[int, str]] = []  # (requests sent by then, script run id) of full runs
        self.finished: set[str] = set()  # script run ids of runs that ended (not cut short by a rerun)

    def watch(self, page) -> ScriptRuns:
        """Follow ``page``'s connection to the server (for a page whose websocket is not routed)."""

        def socket(ws) -> None:
            if ws.url.endswith("/_stcore/stream"):
                ws.on("framesent", self.sent)
                ws.on("framereceived", self.received)

        page.on("websocket", socket)
        return self

    def sent(self, payload: bytes | str) -> None:
        from streamlit.proto.BackMsg_pb2 import BackMsg

        if isinstance(payload, bytes):
            msg = BackMsg.FromString(payload)
            if msg.WhichOneof("type") == "rerun_script" and not msg.rerun_script.fragment_id:
                self.requested += 1

    def received(self, payload: bytes | str) -> None:
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        if not isinstance(payload, bytes):
            return
        msg = ForwardMsg.FromString(payload)
        kind = msg.WhichOneof("type")
        run = msg.metadata.run
        if run.fragment_ids:
            return
        if kind == "new_session":
            self.started.append((self.requested, run.script_run_id))
        elif kind == "script_finished" and msg.script_finished != ForwardMsg.FINISHED_EARLY_FOR_RERUN:
            self.finished.add(run.script_run_id)

    def mark(self) -> int:
        return self.requested

    def over(self, mark: int) -> bool:
        """Whether a full run started after a request sent after ``mark`` has ended."""
        return any(sent > mark and run in self.finished for sent, run in self.started)

    def wait(self, page, mark: int) -> None:
        """Until the run asked for after ``mark`` is over and the page is finished (``PAGE_FINISHED``)."""
        deadline = time.monotonic() + self.timeout_ms / 1000
        while not self.over(mark):
            if time.monotonic() > deadline:
                raise AssertionError(f"no script run asked for after request {mark} ended: {self.started}")
            page.wait_for_timeout(50)  # lets Playwright deliver the page's websocket frames
        page.wait_for_function(PAGE_FINISHED, timeout=self.timeout_ms)
