"""Uploads do not stay in the server's memory (issue 26, item 3).

Streamlit holds every uploaded file whole in the server process until the browser deletes
it or the session ends. Through the real upload endpoint of a real server, from Chromium:
three large files are uploaded, then refused (not safetensors) or stored; the server's
resident memory (psutil, on its PID) must be back near where it started within 30 s.
The issue's figure is 3 x 450 MiB within 200 MB (measured in docs/hosting.md); here
3 x :data:`MIB` MiB with the same allowance scaled to the bytes uploaded, plus a floor
for what a page run itself allocates.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.servers import PAGE_FINISHED, ScriptRuns, chromium, need_browser, server_pid, streamlit_server

pytestmark = pytest.mark.browser

need_browser()

#: Size of each of the three files (``WSE_TEST_UPLOAD_MIB=450`` measures the issue's case).
MIB = int(os.environ.get("WSE_TEST_UPLOAD_MIB", "80"))
#: Allowed growth after the files are gone: 200 MB per 3 x 450 MiB (the issue's), at least 40 MB.
ALLOWED_MB = max(40.0, 200 * MIB / 450)


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 1e6


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("upload-memory")
    env = {"WSE_CACHE_DIR": str(root / "cache"), "WSE_ALLOW_LOCAL_PATHS": "0", "WSE_DEMO_AUTOBUILD": "0"}
    with streamlit_server(env, root / "streamlit.log") as url:
        yield url, root


def _open_models(page, url: str, runs: ScriptRuns | None = None) -> ScriptRuns:
    """The Models page opened and settled (its uploader ready); the memory measured after it.
    Its script runs (:class:`tests.servers.ScriptRuns`) are followed from here on, through
    ``runs`` where given (a page whose websocket the test routes feeds it)."""
    page.set_default_timeout(120_000)
    if runs is None:
        runs = ScriptRuns().watch(page)
    page.goto(f"{url}/models")
    page.get_by_role("heading", name="Models").first.wait_for()
    page.wait_for_function(PAGE_FINISHED)
    return runs


def _big_files(root: Path, valid: bool) -> list[Path]:
    files = []
    for i in range(3):
        path = root / ("valid" if valid else "junk") / f"part-{i}.safetensors"
        path.parent.mkdir(exist_ok=True)
        if valid:
            import torch
            from safetensors.torch import save_file

            n = MIB * 2**20 // 4 // 1024
            save_file({f"layers.{i}.mlp.weight": torch.randn(n, 1024)}, str(path))
        else:
            path.write_bytes(b"\x01" * (MIB * 2**20))
        files.append(path)
    return files


@pytest.mark.parametrize("valid", [False, True], ids=["refused", "stored"])
def test_uploaded_files_leave_server_memory_once_refused_or_stored(server: tuple[str, Path], valid: bool) -> None:
    if valid and 3 * MIB * 2**20 > 500e6:
        pytest.skip("three files this large are over the 500 MB cap of one upload together: never stored")
    url, root = server
    files = _big_files(root, valid)
    pid = server_pid(url)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        runs = _open_models(page, url)
        start = rss_mb(pid)
        chosen = runs.mark()
        page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files([str(f) for f in files])
        page.get_by_test_id("stFileChip").nth(2).wait_for()
        uploaded = 3 * MIB * 2**20 / 1e6
        deadline = time.monotonic() + 60
        while (held := rss_mb(pid)) - start < 0.8 * uploaded and time.monotonic() < deadline:
            time.sleep(0.5)  # until the three requests are in
        # The browser hands the files to the script (a rerun) only once all three uploads are
        # answered; *Add* before that run is over would find no files in session state.
        runs.wait(page, chosen)
        page.get_by_role("button", name="Add the upload as a fine-tune").click()
        outcome = page.get_by_text("Upload refused" if not valid else "as a fine-tune.", exact=False)
        outcome.first.wait_for()
        answered = time.monotonic()
        after = rss_mb(pid)
        while after - start > ALLOWED_MB and time.monotonic() - answered < 30:
            time.sleep(1)
            after = rss_mb(pid)
    figures = {"files_mib": [MIB] * 3, "start_mb": start, "with_files_mb": held, "after_30s_mb": after,
               "allowed_mb": ALLOWED_MB, "load_1min": os.getloadavg()[0]}  # fmt: skip
    print(json.dumps({"refused" if not valid else "stored": figures}))
    assert held - start > 0.8 * uploaded, f"the upload was not in server memory ({start:.0f} -> {held:.0f} MB)"
    assert after - start <= ALLOWED_MB, (
        f"server RSS {start:.0f} MB before, {held:.0f} MB with the files, {after:.0f} MB 30 s after they were "
        f"{'stored' if valid else 'refused'}"
    )


#: The page's connection to its server is up (Streamlit's own end-to-end tests read this attribute).
CONNECTED = '[data-testid="stApp"][data-test-connection-state="CONNECTED"]'


#: Size of each file chosen in a tab that is then closed without *Add* (two tabs);
#: ``WSE_TEST_ABANDONED_MIB=450`` with three tabs is the issue's case (docs/hosting.md).
ABANDONED_MIB = int(os.environ.get("WSE_TEST_ABANDONED_MIB", "150"))
ABANDONED_TABS = int(os.environ.get("WSE_TEST_ABANDONED_TABS", "2"))


def test_files_chosen_in_a_closed_tab_leave_server_memory(server: tuple[str, Path]) -> None:
    """Files chosen in tabs that close without *Add*: Streamlit keeps a closed tab's session,
    its files with it, for ``server.disconnectedSessionTTL`` (120 s) and then until another
    session comes or goes (and a reference cycle of the dropped session's state kept one file
    after that); the server must let go of them within 30 s of the tabs closing."""
    url, root = server
    files = []
    for i in range(ABANDONED_TABS):
        path = root / "abandoned" / f"chosen-{i}.safetensors"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"\x02" * (ABANDONED_MIB * 2**20))
        files.append(path)
    pid = server_pid(url)
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        start = None
        for i, path in enumerate(files):
            page = context.new_page()
            runs = _open_models(page, url)
            if start is None:
                start = rss_mb(pid)
            before = rss_mb(pid)
            chosen = runs.mark()
            page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files([str(path)])
            page.get_by_test_id("stFileChip").first.wait_for()
            deadline = time.monotonic() + 60
            while rss_mb(pid) - before < 0.8 * ABANDONED_MIB * 2**20 / 1e6 and time.monotonic() < deadline:
                time.sleep(0.5)  # until the request is in
            runs.wait(page, chosen)  # the uploader's own script run (check_pending), over
            assert not page.get_by_text("Upload refused").count(), f"file {i} was refused as it was chosen"
        held = rss_mb(pid)
        context.close()  # the tabs close; nothing was added
        closed = time.monotonic()
        after = rss_mb(pid)
        allowed = max(40.0, 200 * ABANDONED_TABS * ABANDONED_MIB / (3 * 450))
        while after - start > allowed and time.monotonic() - closed < 30:
            time.sleep(1)
            after = rss_mb(pid)
        released_s = time.monotonic() - closed
    chosen = ABANDONED_TABS * ABANDONED_MIB * 2**20 / 1e6
    figures = {"files_mib": [ABANDONED_MIB] * ABANDONED_TABS, "start_mb": start, "with_files_mb": held,
               "after_close_mb": after, "seconds": round(released_s, 1), "allowed_mb": allowed,
               "load_1min": os.getloadavg()[0]}  # fmt: skip
    print(json.dumps({"closed without Add": figures}))
    assert held - start > 0.8 * chosen, f"the files were not in server memory ({start:.0f} -> {held:.0f} MB)"
    assert after - start <= allowed, (
        f"server RSS {start:.0f} MB before, {held:.0f} MB with the files chosen, still {after:.0f} MB 30 s after "
        "their tabs closed"
    )


def test_a_tab_that_reconnects_after_its_files_were_let_go(server: tuple[str, Path]) -> None:
    """A tab whose connection drops for longer than ``ui.upload_memory.UPLOAD_GRACE_S`` (its session
    kept by Streamlit for the reconnect) loses the files it chose: the server lets go of them
    while it is away; back, *Add* neither crashes (the uploader's value in session state then
    holds Streamlit's ``DeletedFile`` stand-ins) nor adds anything: it asks for the files again,
    and choosing them again works."""
    url, root = server
    path = root / "reconnect.safetensors"
    path.write_bytes(b"\x03" * (100 * 2**20))
    pid = server_pid(url)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        link = {"down": False, "open": []}
        runs = ScriptRuns()  # a routed websocket: its frames are handed over here

        def stream(ws) -> None:  # the page's connection to the server, cut on demand
            if link["down"]:
                ws.close()
                return
            upstream = ws.connect_to_server()
            ws.on_message(lambda message: (runs.sent(message), upstream.send(message)))
            upstream.on_message(lambda message: (runs.received(message), ws.send(message)))
            link["open"].append((ws, upstream))

        page.route_web_socket("**/_stcore/stream", stream)
        _open_models(page, url, runs)
        start = rss_mb(pid)
        chosen = runs.mark()
        page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files([str(path)])
        page.get_by_test_id("stFileChip").first.wait_for()
        runs.wait(page, chosen)  # uploaded, and the run that hands the file to the script over
        held = rss_mb(pid)
        link["down"] = True
        for ws, upstream in link["open"]:
            upstream.close()
            ws.close()
        cut = time.monotonic()
        away = rss_mb(pid)
        while away - start > 40 and time.monotonic() - cut < 30:
            page.wait_for_timeout(1000)
            away = rss_mb(pid)
        assert held - start > 80, f"the file was not in server memory ({start:.0f} -> {held:.0f} MB)"
        assert away - start <= 40, f"{start:.0f} MB before, {held:.0f} MB with the file, {away:.0f} MB 30 s after"
        page.wait_for_function(f"!document.querySelector('{CONNECTED}')")  # the page knows it is cut off
        link["down"] = False  # the page reconnects to its session (within Streamlit's 120 s)
        page.wait_for_function(f"document.querySelector('{CONNECTED}') !== null")
        page.wait_for_function(PAGE_FINISHED)
        page.get_by_role("button", name="Add the upload as a fine-tune").click()
        page.get_by_text("choose them again").first.wait_for()
        # The run that says so gives the uploader a new key: until it ends, the old (stale)
        # uploader is still on the page beside the new one.
        page.wait_for_function(PAGE_FINISHED)
        shown = page.locator('[data-testid="stAlert"], [data-testid="stException"]').all_inner_texts()
        chips = page.get_by_test_id("stFileChip").count()
        chosen = runs.mark()
        page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files([str(path)])
        page.get_by_test_id("stFileChip").first.wait_for()
        runs.wait(page, chosen)  # *Add* before this would find no file: "Choose the files to upload first"
        page.get_by_role("button", name="Add the upload as a fine-tune").click()
        page.get_by_text("Upload refused").first.wait_for()  # not safetensors: refused, the usual way
        page.wait_for_function(PAGE_FINISHED)  # the stale alerts of the run before are gone
        again = page.locator('[data-testid="stAlert"], [data-testid="stException"]').all_inner_texts()
    print(json.dumps({"reconnected": {"start_mb": start, "with_file_mb": held, "while_away_mb": away}}))
    assert not any("Error" in a for a in shown + again), shown + again
    assert not any("Added" in a for a in shown), shown
    assert chips == 0, "the uploader still shows the files the server let go of"
    assert any("not a safetensors file" in a for a in again), again
