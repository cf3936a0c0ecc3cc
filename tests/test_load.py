"""Eight visitors at once on a cold server: each view's settings come from its own link.

A fresh ``streamlit run app.py`` (nothing cached, no session yet) and eight browser
contexts opening shared links at the same moment, on different pages, none naming ``k``
or ``eps`` and one naming its own. Every page must end with exactly the settings its link
asked for (the defaults where it named none): in the sliders, in the chart titles and in
the address bar. Tiny models (tests/factories.py) keep it light on a 2-core machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, quote, urlparse

import pytest

from analysis.results import DEFAULT_EPSILON, DEFAULT_TOP_K
from tests.servers import CHROMIUM, PAGE_FINISHED, REPO, need_browser, streamlit_server

pytestmark = pytest.mark.browser

ARTIFACTS = REPO / "test-artifacts" / "load"
TIMEOUT_MS = 120_000
#: Until every page has drawn its charts, from the first navigation. Both analyses are
#: shared by all eight pages; they run one at a time in the server process, beside eight
#: sessions polling their progress and eight Chromium tabs. On 2 cores beside another
#: test (pytest -n 2) that is 1-2 minutes; on a 2-core machine at load 10-15 the first
#: results came after 170-210 s. Slow is not wrong: what must never happen is one page
#: staying on its progress view after the others drew (:data:`STRAGGLER_S`).
DEADLINE_S = 330
#: A page may draw at most this long after the first page did (the jobs are the same).
STRAGGLER_S = 60

sync_api = need_browser()

SCRIPT_DONE = """() => document.querySelector('[data-testid="stApp"][data-test-script-state="notRunning"]')
                     && !document.querySelector('[data-testid="stStatusWidget"]')
                     && !document.querySelector('[data-testid="stProgress"]')"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests import factories

    root = tmp_path_factory.mktemp("load")
    base = factories.make_bert(root / "base", seed=0)
    return {
        "root": root,
        "base": base,
        "r8": factories.make_lora_adapter(base, root / "lora-r8", r=8, seed=3, factor_std=0.3),
        "r2": factories.make_lora_adapter(base, root / "lora-r2", r=2, seed=4, factor_std=0.3),
    }


@pytest.fixture(scope="module")
def server(models: dict[str, Path]) -> Iterator[str]:
    env = {"WSE_CACHE_DIR": str(models["root"] / "cache"), "WSE_ALLOW_LOCAL_PATHS": "1"}
    with streamlit_server(env, models["root"] / "streamlit.log") as url:
        yield url


def _sliders(page) -> dict[str, str | None]:
    """The sidebar sliders' values by label start ("k", "ε")."""
    values = {}
    for slider in page.get_by_test_id("stSidebar").get_by_test_id("stSlider").all():
        label = slider.get_by_test_id("stWidgetLabel").text_content().strip()
        values[label.split(":")[0]] = slider.get_by_test_id("stSliderThumbValue").first.text_content().strip()
    return values


def test_eight_visitors_on_a_cold_server_keep_their_own_settings(server: str, models: dict[str, Path]) -> None:
    base, r8, r2 = (quote(str(models[n])) for n in ("base", "r8", "r2"))
    shared = f"base={base}&tuned={r8}&tuned={r2}"
    links = [  # (path, query, expected k, expected eps)
        ("overview", shared, DEFAULT_TOP_K, DEFAULT_EPSILON),
        ("intruders", shared, DEFAULT_TOP_K, DEFAULT_EPSILON),
        ("spectrum", shared, DEFAULT_TOP_K, DEFAULT_EPSILON),
        ("similarity", shared, DEFAULT_TOP_K, DEFAULT_EPSILON),
        ("effective_rank", shared, None, None),
        ("overview", shared + "&k=3&eps=0.3", 3, 0.3),
        ("intruders", shared, DEFAULT_TOP_K, DEFAULT_EPSILON),
        ("spectrum", shared, DEFAULT_TOP_K, DEFAULT_EPSILON),
    ]
    started = time.perf_counter()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-background-networking", "--disable-gpu"]
        )
        pages = []
        for _ in links:
            context = browser.new_context(viewport={"width": 1200, "height": 900})
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            pages.append(page)
        # All at once: navigation is started on every page before any is waited on.
        for page, (path, query, _, _) in zip(pages, links, strict=True):
            page.goto(f"{server}/{path}?{query}", wait_until="commit")
        problems = []
        drawn_at = _wait_until_drawn(pages, started)
        first = min(drawn_at.values(), default=None)
        for index, (page, (path, _, _, _)) in enumerate(zip(pages, links, strict=True)):
            if index not in drawn_at or drawn_at[index] - first > STRAGGLER_S:
                when = f"at {drawn_at[index]:.0f} s" if index in drawn_at else f"not by {DEADLINE_S} s"
                text = page.locator("[data-testid='stMain']").inner_text()[:400]
                problems.append(
                    f"visitor {index} /{path}: drawn {when} (first page: {first and round(first)} s): "
                    f"{page.url[-60:]} {text!r}"
                )
        for page, (path, query, k, eps) in zip(pages, links, strict=True):
            if pages.index(page) not in drawn_at:
                continue
            # Drawn is not done: a page draws its first results while the second analysis is
            # queued or starting (no progress bar, a Cancel button) and reruns when it ends.
            page.wait_for_function(PAGE_FINISHED, timeout=TIMEOUT_MS)
            assert not page.get_by_test_id("stException").count(), path
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"visitor-{pages.index(page)}-{path}.png"))
            params = parse_qs(urlparse(page.url).query)
            where = f"/{path}?{query[-20:]}"
            if urlparse(page.url).path.strip("/") not in ({path, ""} if path == "overview" else {path}):
                problems.append(f"{where}: ended on {page.url}")
            if k is None:
                continue
            if params.get("k") != [str(k)] or float(params.get("eps", ["nan"])[0]) != eps:
                problems.append(f"{where}: address bar says k={params.get('k')} eps={params.get('eps')}")
            sliders = _sliders(page)
            if sliders.get("k") != str(k) or float(sliders.get("ε") or "nan") != eps:
                problems.append(f"{where}: sliders say {sliders}")
            if path == "overview" and f"among the top {k} singular" not in page.get_by_test_id("stMain").inner_text():
                problems.append(f"{where}: the page does not say top {k}")
        browser.close()
    assert not problems, "\n".join(problems)
    assert time.perf_counter() - started < DEADLINE_S + 60


def _drawn(page) -> bool:
    """The page's script is done and a chart is on it."""
    try:
        return page.evaluate(f"() => !!({SCRIPT_DONE})()") and page.locator(".js-plotly-plot .main-svg").count() > 0
    except sync_api.Error:  # navigating (a rerun through app.py replaced the page's context)
        return False


def _wait_until_drawn(pages: list, started: float) -> dict[int, float]:
    """Seconds from ``started`` at which each page first showed its charts (all polled
    together, so a page left behind is told from a slow server)."""
    drawn_at: dict[int, float] = {}
    while len(drawn_at) < len(pages) and time.perf_counter() - started < DEADLINE_S:
        for index, page in enumerate(pages):
            if index not in drawn_at and _drawn(page):
                drawn_at[index] = time.perf_counter() - started
        time.sleep(0.5)
    return drawn_at


@pytest.mark.skipif(
    not os.environ.get("WSE_TEST_LOAD"), reason="a measurement of minutes: set WSE_TEST_LOAD=1 (docs/hosting.md)"
)
def test_eight_analyses_leave_the_server_responsive(tmp_path: Path) -> None:
    """Issue 26's figures: with eight different analyses queued or running, a fresh visitor's
    page within 10 s, the health endpoint within 2 s, and each visitor's results within 1.5x
    the command line's time for the same eight, one after another: ready on the server, and
    drawn in the visitor's page (``benchmarks/hosting_load.py``, which prints the same
    figures). With nine browsers on the server's own two cores the drawn figure is the
    browsers' time and fails (3.5-5x: docs/hosting.md); it is kept as the issue states it."""
    from benchmarks import hosting_load

    base, tuned = hosting_load.build_models(tmp_path / "models")
    cli = hosting_load.cli_seconds(base, tuned, tmp_path)
    figures = hosting_load.measure(base, tuned, tmp_path)
    figures["cli_sequential_s"] = cli
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "eight-analyses.json").write_text(str(figures))
    assert figures["fresh_visitor_page_s"] <= 10, figures
    assert figures["health_max_s"] <= 2, figures
    assert max(figures["results_server_s"]) <= 1.5 * cli, figures
    drawn = max(figures["results_drawn_s"])
    if drawn > 1.5 * cli:
        (tmp_path / "floor").mkdir()
        floor = hosting_load.measure(base, tuned, tmp_path / "floor", cached=True)
        figures["floor_drawn_s"] = floor["results_drawn_s"]
        (ARTIFACTS / "eight-analyses.json").write_text(str(figures))
    assert drawn <= 1.5 * cli, (
        f"drawn up to {drawn} s, {drawn / cli:.1f}x the command line's {cli:.1f} s; the browsers alone, with nothing "
        f"to compute, drew in {figures.get('floor_drawn_s')} s",
        figures,
    )
