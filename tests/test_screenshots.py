"""scripts/qa_screenshots.py waits for a page's real finished state on a cold server: not
the moment the first script run ends on "Starting the analysis of ..." (no progress bar
yet), which it used to take as done, shooting the page before any chart; nor while a fresh
browser still shows skeletons where the charts will be."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

from tests.servers import REPO, chromium, need_browser, streamlit_server

need_browser()

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

TIMEOUT_MS = 300_000
#: What the page shows once the wait is over.
SEEN = """() => ({
  charts: document.querySelectorAll('[data-testid="stPlotlyChart"]').length,
  progress: document.querySelectorAll('[data-testid="stProgress"]').length,
  cancel: [...document.querySelectorAll('button')].some(b => b.innerText.trim() === 'Cancel'),
  starting: document.body.innerText.includes('Starting the analysis'),
  skeletons: document.querySelectorAll('[data-testid="stSkeleton"]').length,
})"""


def _script():
    spec = importlib.util.spec_from_file_location("qa_screenshots", REPO / "scripts" / "qa_screenshots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cold_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh server over the stand-in demo with nothing analysed yet (its own cache)."""
    from tests.app_fixtures import make_standin_demo

    root = tmp_path_factory.mktemp("screenshots")
    make_standin_demo(root / "cache" / "demo")
    with streamlit_server({"WSE_CACHE_DIR": str(root / "cache")}, root / "streamlit.log", script="app.py") as url:
        yield url


@pytest.mark.parametrize("width", [1400, 390])
def test_screenshot_wait_ends_when_the_analysis_has_drawn(cold_server: str, width: int) -> None:
    qa = _script()
    tuned = "demo%3Alora-r1" if width == 1400 else "demo%3Alora-r8"  # each a cold analysis
    with chromium("--disable-gpu") as browser:
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{cold_server}/overview?base=demo%3Abase&tuned={tuned}")
        page.wait_for_selector('[data-testid="stApp"]')
        page.wait_for_timeout(800)
        qa.wait_idle(page, TIMEOUT_MS)
        seen = page.evaluate(SEEN)
    assert seen == {"charts": seen["charts"], "progress": 0, "cancel": False, "starting": False, "skeletons": 0}
    assert seen["charts"] > 0, seen


def test_the_script_shoots_every_page() -> None:
    # It left out the RL vs SFT page (pages/rl_measures.py), which then went unseen.
    pages = {path.stem for path in (REPO / "pages").glob("*.py") if path.stem != "__init__"}
    assert set(_script().PAGES) == pages
