"""The first seconds on a cold server (issue 25, item 2): no raw page list, ever.

Before a server's first ``st.navigation`` call, Streamlit treats an app beside a ``pages/``
folder as an old-style multipage app and lists the folder's files by name in the sidebar
("app", "effective rank", ...). A fresh server, watched from the browser's first paint
with a MutationObserver: that list must never appear, the sidebar's titled entries must be
what it first shows, and the page's title must come before anything heavy is done.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import CHROMIUM, need_browser, streamlit_server

pytestmark = pytest.mark.browser

sync_api = need_browser()

#: Installed before any page script: every change of the page is checked for Streamlit's
#: own page list and the sidebar's links are recorded as first seen.
WATCH = """
window.__paint = {rawNav: [], firstLinks: null, titleAt: null, linksAt: null, t0: performance.now()};
new MutationObserver(() => {
  const p = window.__paint;
  const nav = document.querySelector('[data-testid="stSidebarNav"]');
  const names = nav ? nav.innerText.split('\\n').map(s => s.trim()) : [];
  if (names.includes('app') || names.includes('effective rank')) p.rawNav.push(nav.innerText);
  const links = [...document.querySelectorAll('[data-testid="stSidebar"] [data-testid="stPageLink-NavLink"]')];
  if (links.length && p.firstLinks === null) {
    p.firstLinks = links.map(a => a.innerText.trim().split('\\n').pop().trim());
    p.linksAt = performance.now() - p.t0;
  }
  if (p.titleAt === null && document.querySelector('[data-testid="stMain"] h1')) p.titleAt = performance.now() - p.t0;
}).observe(document, {subtree: true, childList: true, characterData: true});
"""
#: The page's own run (through app.py: the one that titles the page) is over. Not the
#: script state alone: a deep link's first run on a cold server goes through Streamlit's old
#: multipage path and reruns at once (ui.state.ensure_app_navigation), and between the two
#: runs the page reads "notRunning" with nothing drawn yet.
SCRIPT_DONE = """() => document.querySelector('[data-testid="stApp"][data-test-script-state="notRunning"]')
                     && document.querySelector('[data-testid="stMain"] h1') !== null"""
TITLES = ["Overview", "Singular-vector similarity", "Intruders vs ε", "Effective rank", "Spectrum",
          "Subspace similarity", "Checkpoint series", "RL vs SFT", "Mitigate", "Models"]  # fmt: skip


@pytest.fixture(scope="module")
def cold_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("first-paint")
    with streamlit_server({"WSE_CACHE_DIR": str(root / "cache")}, root / "streamlit.log") as url:
        yield url


@pytest.mark.parametrize("path", ["effective_rank", "", "models"])
def test_a_cold_server_never_shows_the_raw_page_list(cold_server: str, path: str) -> None:
    """The first visitor of a fresh server comes in on a deep link (the old multipage path
    runs pages/<name>.py directly), later ones on the home page and the Models page."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-background-networking"]
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.add_init_script(WATCH)
        page.goto(f"{cold_server}/{path}")
        page.wait_for_function(SCRIPT_DONE, timeout=120_000)
        page.wait_for_timeout(1000)
        paint = page.evaluate("() => window.__paint")
        heading = page.locator("[data-testid='stMain'] h1").first.inner_text()
        browser.close()
    assert paint["rawNav"] == [], f"Streamlit's own page list was shown: {paint['rawNav'][:2]}"
    assert paint["firstLinks"] == TITLES, paint["firstLinks"]
    assert paint["titleAt"] is not None
    expected = {"effective_rank": "Effective rank", "": "Overview", "models": "Models"}[path]
    assert expected.lower() in heading.lower(), heading
