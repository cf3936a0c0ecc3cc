"""The checkpoint-series page in a real headless Chromium against a real ``streamlit run``.

A server with its own cache folder; a shared link naming a tiny base and two real series
(full checkpoints and PEFT adapter checkpoints, tests/test_series.py) opens the page at a
desktop (1400 x 900) and a phone (390 x 844) size. Screenshots go to
``test-artifacts/browser/`` (gitignored).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.test_browser import ARTIFACTS, CHROMIUM, REPO, TIMEOUT_MS, _free_port, chart_titles, shot, wait_page
from tests.test_series import make_full_series, make_lora_series

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def series_server(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict]]:
    root = tmp_path_factory.mktemp("series-browser")
    full = make_full_series(tiny_bert, root / "full-run")
    lora = make_lora_series(tiny_bert, root / "lora-run", steps=(1, 2, 3, 4))
    port = _free_port()
    env = {**os.environ, "WSE_CACHE_DIR": str(root / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
               "--server.port", str(port), "--server.address", "127.0.0.1"]  # fmt: skip
    log_path = root / "streamlit.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
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
        params = {"base": str(tiny_bert), "tuned": [f"series:{full}", f"series:{lora}"], "series": f"series:{lora}"}
        yield url, params
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:  # pragma: no cover
            process.kill()


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
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot .gtitle').length >= 3")
        except Exception:
            shot(page, f"series-{width}x{height}-failed")
            raise
        titles = chart_titles(page)
        assert any("against training step" in t for t in titles), titles
        assert any("by training step" in t for t in titles), titles
        # the grid and the similarity heatmap each carry a step slider with one stop per step
        sliders = page.locator(".js-plotly-plot .slider-container")
        assert sliders.count() == 2
        grid = page.locator(".js-plotly-plot").nth(1)
        labels = grid.locator(".slider-group .slider-label").evaluate_all("els => els.map(e => e.textContent)")
        assert labels == ["step 4", "1", "2", "3", "4"], labels  # the current value (the last step), then each step
        assert "series=" in page.url
        shot(page, f"series-{width}x{height}")
        for index, name in enumerate(("trends", "grid", "similarity")):
            chart = page.locator(".js-plotly-plot").nth(index)
            chart.scroll_into_view_if_needed()
            chart.screenshot(path=str(ARTIFACTS / f"series-{width}x{height}-{name}.png"))
        browser.close()
