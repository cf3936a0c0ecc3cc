"""The dashboard opens a quantised base and its fine-tune in a real Chromium (issue 22).

An FP8 block-scaled tiny Llama base (quantised by transformers' ``Fp8Quantize``) and a bf16
full fine-tune, given as a shared link: the Models page says how each is stored before
Analyse, the analysis runs, and every page draws.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import torch

from tests.servers import chromium, need_browser, streamlit_server
from tests.test_browser import PAGES, go_to, shot, wait_page

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

need_browser()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests import families, quantised
    from tests.app_fixtures import make_standin_demo

    root = tmp_path_factory.mktemp("quantised-browser")
    make_standin_demo(root / "cache" / "demo")
    families.quiet()
    base = families.save(families.build("llama"), "llama", root / "llama-base")
    tuned_model = families.build("llama")
    families.perturb(tuned_model)
    tuned = families.save(tuned_model.to(torch.bfloat16), "llama", root / "llama-tuned")
    return {
        "cache": root / "cache",
        "base": quantised.fp8_blocks(base, root / "llama-fp8"),
        "tuned": tuned,
        "log": root / "streamlit.log",
    }


@pytest.fixture(scope="module")
def server(files: dict[str, Path]) -> Iterator[str]:
    with streamlit_server({"WSE_CACHE_DIR": str(files["cache"])}, files["log"]) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with chromium("--disable-gpu") as instance:
        yield instance


def test_a_quantised_base_shows_its_storage_and_every_page_draws(server: str, browser, files) -> None:
    context = browser.new_context(viewport={"width": 1400, "height": 1300})
    page = context.new_page()
    page.set_default_timeout(180_000)
    page.goto(f"{server}/models?base={quote(str(files['base']))}&tuned={quote(str(files['tuned']))}")
    wait_page(page, "Models", charts=False)
    page.get_by_text(re.compile(r"14 matrices matched")).wait_for()
    page.get_by_text(re.compile(r"stored as base fp8 e4m3, 16x16 blocks \(14\); fine-tune bf16 \(14\)")).wait_for()
    shot(page, "quantised-01-models")
    page.get_by_role("button", name="Analyse").click()
    page.get_by_text(re.compile(r"llama-tuned: 14 matrices[.;]")).wait_for()
    for number, (link, title) in enumerate(PAGES, start=2):
        go_to(page, link, title)
        assert page.locator(".js-plotly-plot").count() >= 1, link
        assert not page.get_by_test_id("stException").count(), link
        shot(page, f"quantised-{number:02d}-{title.lower().replace(' ', '-').replace('ε', 'eps')}")
    assert "llama-tuned" in page.locator("[data-testid='stMain']").inner_text()
    context.close()
