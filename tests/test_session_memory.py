"""A closed tab's session leaves the server (a hosted instance must not grow with every visitor).

A real server (``serve.py``) with a probe inside it (tests/session_probe: on ``SIGUSR1`` it runs a
full ``gc.collect()`` and lists the Streamlit sessions whose objects are still alive). Chromium
opens pages of a stand-in demo in several tabs (analyses run, progress fragments poll, a file is
chosen in the Models page's uploader), closes them, waits past ``server.disconnectedSessionTTL``
(5 s here) and lets another tab come and go, so Streamlit drops the closed sessions. After that,
nothing of ours may hold them: no ``AppSession``, ``SessionState`` or ``ScriptRunContext`` of a
session Streamlit no longer knows, and no live thread carrying such a context. One exception is
Streamlit's own: the last session its ``Runtime._loop_coroutine`` flushed stays referenced by the
coroutine's loop variable until another session's messages are sent (at most one session;
docs/hosting.md, "Closed sessions").
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import PAGE_FINISHED, REPO, chromium, need_browser, server_pid, streamlit_server

pytestmark = pytest.mark.browser

need_browser()

#: Pages opened in each round, one tab each (``upload``: the Models page with a file chosen, not added).
PAGES = ("overview", "similarity", "spectrum", "upload")
ROUNDS = 2
TTL_S = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    from tests.app_fixtures import make_standin_demo

    root = tmp_path_factory.mktemp("session-memory")
    make_standin_demo(root / "cache" / "demo")
    probe = str(REPO / "tests" / "session_probe")
    env = {
        "WSE_CACHE_DIR": str(root / "cache"),
        "WSE_DEMO_AUTOBUILD": "0",
        "STREAMLIT_SERVER_DISCONNECTED_SESSION_TTL": str(TTL_S),
        "PYTHONPATH": os.pathsep.join(filter(None, [probe, os.environ.get("PYTHONPATH")])),
        "WSE_TEST_SESSION_PROBE": str(root / "probe.json"),
    }
    with streamlit_server(env, root / "streamlit.log") as url:
        yield url, root


def _probe(pid: int, path: Path) -> dict:
    path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while not path.exists():
        assert time.monotonic() < deadline, "the server's session probe did not answer"
        time.sleep(0.2)
    report = json.loads(path.read_text())
    assert "error" not in report, report
    return report


def _open(context, url: str, name: str, upload: Path) -> None:
    page = context.new_page()
    page.set_default_timeout(180_000)
    page.goto(f"{url}/{'models' if name == 'upload' else name}")
    page.wait_for_function(PAGE_FINISHED)
    if name == "upload":
        page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files([str(upload)])
        page.get_by_test_id("stFileChip").first.wait_for()
        page.wait_for_function(PAGE_FINISHED)


@pytest.mark.timeout(900)
def test_closed_tabs_sessions_are_freed(server: tuple[str, Path]) -> None:
    url, root = server
    pid = server_pid(url)
    upload = root / "chosen.safetensors"
    upload.write_bytes(b"\x04" * 2**20)
    reports = []
    with chromium() as browser:
        for _ in range(ROUNDS):
            context = browser.new_context(viewport={"width": 1200, "height": 900})
            for name in PAGES:
                _open(context, url, name, upload)
            context.close()
            time.sleep(TTL_S + 3)
            other = browser.new_context()  # another visitor: its disconnect writes Streamlit's session storage
            _open(other, url, "models", upload)
            other.close()
            time.sleep(TTL_S + 3)
            other = browser.new_context()  # and one more, which drops the one before
            _open(other, url, "models", upload)
            other.close()
            time.sleep(2)
            reports.append(_probe(pid, root / "probe.json"))
    print(json.dumps(reports))
    for report in reports:
        assert not report["stray_sessions"], report
        assert not report["stray_states"], report
        assert not report["stray_contexts"], report
        assert not report["threads_with_stray_context"], report
        assert len(report["sessions"]) <= 2, report  # the last tab (kept for a reconnect) and the loop's
