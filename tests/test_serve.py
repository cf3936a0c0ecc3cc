"""``serve.py`` (what ``run.sh`` starts): the server warms up as it starts, not when its first
visitor comes (issues 25 and 26: a cold server's first page waited for imports)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.servers import REPO, server_pid, streamlit_server


def _workers_of(pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "hosting.workers" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_server_started_on_serve_py_starts_its_workers_before_any_visitor(tmp_path: Path) -> None:
    env = {"WSE_CACHE_DIR": str(tmp_path / "cache"), "WSE_DEMO_AUTOBUILD": "0", "WSE_MAX_JOBS": "2"}
    with streamlit_server(env, tmp_path / "serve.log") as url:
        pid = server_pid(url)
        deadline = time.time() + 60
        while len(_workers_of(pid)) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert len(_workers_of(pid)) == 2, (tmp_path / "serve.log").read_text()[-2000:]
    # The same pages on app.py: nothing starts until a visitor's first page run.
    with streamlit_server(env, tmp_path / "app.log", script="app.py") as url:
        time.sleep(3)
        assert _workers_of(server_pid(url)) == []


def test_warm_up_imports_what_the_pages_import() -> None:
    """In a fresh interpreter, so nothing was imported before."""
    code = (
        "import sys; from ui import early; early.warm_up().join(300);"
        "missing = [m for m in early.WEB_IMPORTS if m not in sys.modules];"
        "assert not missing, missing; assert 'torch' in sys.modules and 'pandas' in sys.modules"
    )
    env = {**os.environ, "WSE_WORKER_PROCESSES": "0", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
