"""Files chosen in one tab and not added count against the visitor's quota in the others.

Streamlit holds a chosen file in the server's memory for as long as its tab is open (and
minutes after it closed). The per-visitor quota checked each tab's own files only, so one
browser could make the server hold ``WSE_UPLOAD_MB_PER_VISITOR`` per tab, in any number of
tabs (measured: three tabs of one browser with a 450 MiB file each held 1.8 GB). Through a
real server from Chromium: a file chosen in a first tab and a second tab of the same browser
choosing one that takes the two past the quota: the second is refused; another browser is not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import PAGE_FINISHED, ScriptRuns, chromium, need_browser, streamlit_server

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

need_browser()

MB = 1024**2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("upload-tabs")
    env = {"WSE_CACHE_DIR": str(root / "cache"), "WSE_ALLOW_LOCAL_PATHS": "0", "WSE_DEMO_AUTOBUILD": "0",
           "WSE_UPLOAD_MB_PER_VISITOR": "3"}  # fmt: skip
    with streamlit_server(env, root / "streamlit.log") as url:
        yield url


def _choose(page, url: str, name: str) -> list[str]:
    """Open the Models page, choose a 2 MB file (not added); the page's errors once the run
    that checks the chosen file (pages/models.py check_pending) is over."""
    runs = ScriptRuns().watch(page)
    page.goto(f"{url}/models")
    page.get_by_role("heading", name="Models").first.wait_for()  # shown by the page's own run
    page.wait_for_function(PAGE_FINISHED)
    chosen = runs.mark()
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(
        [{"name": name, "mimeType": "application/octet-stream", "buffer": b"\1" * (2 * MB)}]
    )
    page.get_by_test_id("stFileChip").first.wait_for()
    runs.wait(page, chosen)
    return page.locator('[data-testid="stAlert"]').all_inner_texts()


def test_files_chosen_in_another_tab_count_against_the_quota(server: str, tmp_path: Path) -> None:
    with chromium() as browser:
        context = browser.new_context()
        first, second = context.new_page(), context.new_page()
        for page in (first, second):
            page.set_default_timeout(120_000)
        assert not any("Upload refused" in a for a in _choose(first, server, "a.safetensors"))
        shown = _choose(second, server, "b.safetensors")
        assert any("one visitor may upload at most 3 MB in all" in a and "not yet added" in a for a in shown), shown
        other = browser.new_context().new_page()  # another browser: its own quota
        other.set_default_timeout(120_000)
        assert not any("Upload refused" in a for a in _choose(other, server, "c.safetensors"))
        context.close()
