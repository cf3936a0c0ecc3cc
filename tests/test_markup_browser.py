"""Crafted names in a shared link, in a real Chromium against ``streamlit run app.py`` (issue 26, A).

A link naming its fine-tune ``[Session expired: log in again](http://attacker/login)`` showed a
working link inside the page's own red error, and ``![x](http://host/pixel.png)`` made the
visitor's browser fetch that address. Each page is opened on such a link; the page must hold
no element linking to the attacker, no image from the recording server, and the recording
server must get no request; the names must be on the page as the text they are. Screenshots
go to ``test-artifacts/browser/markup-*.png`` (and ``$WSE_SHOTS`` when set).
"""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.servers import PAGE_FINISHED, REPO, chromium, need_browser, streamlit_server
from ui.text import WORD_JOINER

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

ARTIFACTS = REPO / "test-artifacts" / "browser"
TIMEOUT_MS = 120_000

need_browser()

PAGES = ("overview", "models", "spectrum", "mitigate", "series")


@pytest.fixture(scope="module")
def recorder() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server that records every request: ``(its address, the paths asked for)``."""
    asked: list[str] = []

    class Record(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            asked.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Record)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()


def crafted(host: str) -> dict[str, list[str]]:
    """The link's names: a Markdown link, a Markdown image and raw HTML (image and link)."""
    return {
        "base": ["[Base expired](http://attacker/base)"],
        "tuned": [
            "[Session expired: log in again](http://attacker/login)",
            f"![x](http://{host}/pixel.png?v=1)",
            f"<img src=http://{host}/raw.png>",
            "<a href=http://attacker/raw>raw</a>",
            "series:[Series expired](http://attacker/series)",
        ],
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("markup")
    with streamlit_server({"WSE_CACHE_DIR": str(root / "cache")}, root / "streamlit.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with chromium("--disable-gpu") as instance:
        yield instance


#: The run is over and nothing is computing (PAGE_FINISHED: nor queued, which shows no
#: progress bar but a Cancel button or a "Starting the analysis" line), and the page says
#: what failed.
SETTLED = f"""() => {PAGE_FINISHED}
                  && [...document.querySelectorAll('[data-testid="stAlert"]')]
                       .some(a => a.innerText.includes('expired'))"""


def shot(page, name: str) -> None:
    folders = [ARTIFACTS] + ([Path(os.environ["WSE_SHOTS"])] if os.environ.get("WSE_SHOTS") else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / f"markup-{name}.png"), full_page=True)


@pytest.mark.parametrize("name", PAGES)
def test_crafted_names_in_a_shared_link_are_plain_text(server, browser, recorder, name: str) -> None:
    host, asked = recorder
    names = crafted(host)
    context = browser.new_context(viewport={"width": 1300, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(f"{server}/{name}?{urlencode(names, doseq=True)}")
        page.wait_for_function(SETTLED, timeout=TIMEOUT_MS)
        page.wait_for_timeout(1500)  # a rerun after the jobs failed; any image would load meanwhile
        page.wait_for_function(SETTLED, timeout=TIMEOUT_MS)
        shot(page, name)
        assert page.locator("a[href*=attacker]").count() == 0
        assert page.locator(f"img[src*='{host}']").count() == 0
        text = page.locator('[data-testid="stApp"]').inner_text().replace(WORD_JOINER, "")
        for shown in ("[Session expired: log in again](http://attacker/login)", "[Base expired](http://attacker/base)"):
            assert shown in text, f"{name}: {shown!r} is not shown as text"
        if name != "series":  # the series page names only the series
            assert f"<img src=http://{host}/raw.png>" in text
        assert asked == [], f"{name}: the visitor's browser fetched {asked}"
    finally:
        context.close()
