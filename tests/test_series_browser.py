"""The checkpoint-series page in a real headless Chromium against a real ``streamlit run``.

A server with its own cache folder; a shared link naming a tiny base and two real series
(full checkpoints and PEFT adapter checkpoints, tests/test_series.py) opens the page at a
desktop (1400 x 900) and a phone (390 x 844) size. Screenshots go to
``test-artifacts/browser/`` (gitignored).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.servers import CHROMIUM, PAGE_FINISHED, need_browser, streamlit_server
from tests.test_browser import ARTIFACTS, TIMEOUT_MS, chart_titles, shot, wait_page
from tests.test_series import make_full_series, make_lora_series

pytestmark = pytest.mark.browser
sync_api = need_browser()


@pytest.fixture(scope="module")
def series_server(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict]]:
    root = tmp_path_factory.mktemp("series-browser")
    full = make_full_series(tiny_bert, root / "full-run")
    lora = make_lora_series(tiny_bert, root / "lora-run", steps=(1, 2, 3, 4))
    params = {"base": str(tiny_bert), "tuned": [f"series:{full}", f"series:{lora}"], "series": f"series:{lora}"}
    with streamlit_server({"WSE_CACHE_DIR": str(root / "cache")}, root / "streamlit.log") as url:
        yield url, params


@pytest.mark.parametrize(("width", "height"), [(1400, 900), (390, 844)])
def test_series_page_in_a_browser(series_server, width: int, height: int) -> None:
    url, params = series_server
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-background-networking", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": width, "height": height})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{url}/series?{urlencode(params, doseq=True)}")
        wait_page(page, "Checkpoint series")
        try:
            page.get_by_text("4 of 4 checkpoints analysed").wait_for(timeout=120_000)
            # The run that says so is not over yet: below the line, the charts of the run
            # before ("at step 3") stand until it sends its own.
            page.wait_for_function(PAGE_FINISHED)
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot .gtitle').length >= 3")
        except Exception:
            shot(page, f"series-{width}x{height}-failed")
            raise
        titles = chart_titles(page)
        assert any("against training step" in t for t in titles), titles
        # the grid and the similarity heatmap both show the step of the page's one step
        # control (the last by default); no chart carries a slider or play button of its own
        assert sum("at step 4" in t for t in titles) == 2, titles
        assert page.locator(".js-plotly-plot .slider-container").count() == 0
        assert page.locator(".js-plotly-plot .updatemenu-container").count() == 0
        assert page.get_by_test_id("stSlider").filter(has_text="Training step").count() == 1
        assert "series=" in page.url
        shot(page, f"series-{width}x{height}")
        # the RL-versus-SFT chart waits, folded, in its expander: the three on screen
        for index, name in enumerate(("trends", "grid", "similarity")):
            chart = page.locator(".js-plotly-plot:visible").nth(index)
            chart.scroll_into_view_if_needed()
            chart.screenshot(path=str(ARTIFACTS / f"series-{width}x{height}-{name}.png"))
        browser.close()
