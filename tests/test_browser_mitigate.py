"""The Mitigate page in a real headless Chromium against a real ``streamlit run app.py``
(the harness and stand-in demo of tests/test_browser.py): a shared link opens the view,
the PEFT zip downloads and PEFT loads it. The trade-off curve is left off in the link (it
runs all-MiniLM-L6-v2 seven times, minutes on a busy 2-core machine); tests/test_mitigate.py
checks it on a tiny model. Screenshots at 1400x900 and 390x844 go to ``test-artifacts/browser/``."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tests.test_browser import (  # noqa: F401 - fixtures used by name
    ARTIFACTS,
    TIMEOUT_MS,
    browser,
    chart_titles,
    files,
    server,
    shot,
    wait_page,
)

pytestmark = pytest.mark.browser


def test_mitigate_page_from_a_shared_link_draws_and_exports(server: str, browser, tmp_path: Path) -> None:  # noqa: F811
    query = "base=demo%3Abase&tuned=demo%3Alora-r1&model=demo%3Alora-r1&k=10&eps=0.5&lam=0.5&rule=peft&exact=0&curve=0"
    url = f"{server}/mitigate?{query}"
    for width, height in ((1400, 900), (390, 844)):
        context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        wait_page(page, "Intruder mitigation")
        titles = chart_titles(page)
        # A short first line (a phone cut the long one), the details below it.
        assert titles[0].startswith("Intruders vs ε, before and after") and "summed over 12 matrices" in titles[0]
        assert len(titles) == 2, titles  # the sweep and the spectra (the curve is off in this link)
        assert not page.get_by_test_id("stException").count()
        assert "lam=0.5" in page.url and "rule=peft" in page.url  # the view stays in the address bar
        shot(page, f"20-mitigate-{width}x{height}")
        page.screenshot(path=str(ARTIFACTS / f"21-mitigate-{width}x{height}-viewport.png"))  # the first screen
        page.get_by_role("heading", name="Spectra before and after").scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / f"22-mitigate-{width}x{height}-spectra.png"))
        if width == 1400:
            with page.expect_download() as download:
                page.get_by_role("button", name="Mitigated adapter (PEFT folder, zip)").click()
            archive = tmp_path / "mitigated.zip"
            Path(download.value.path()).replace(archive)
            with zipfile.ZipFile(archive) as z:
                assert {"adapter_config.json", "adapter_model.safetensors"} <= set(z.namelist())
                z.extractall(tmp_path / "adapter")
        context.close()
    from demo import base_model_path
    from tests.factories import peft_merged_state_dict

    merged = peft_merged_state_dict(base_model_path(), tmp_path / "adapter")  # PEFT loads and merges it
    assert "encoder.layer.0.attention.self.query.weight" in merged
