"""The dashboard in a real headless Chromium against a real ``streamlit run app.py``.

One server for the module, with ``WSE_CACHE_DIR`` in a temporary folder holding a stand-in
demo build (tests/app_fixtures.py: the real all-MiniLM-L6-v2 base, a full "fine-tune" and
LoRA adapters of it). The tests open the app, visit every page, click a grid cell, upload a
PEFT adapter through the file chooser, open a shared URL in a fresh browser context, upload
a corrupt file, download the JSON and HTML reports, time cached re-renders. Screenshots go to
``test-artifacts/browser/`` (gitignored).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

from tests.servers import PAGE_FINISHED, REPO, ScriptRuns, chromium, need_browser, streamlit_server

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

ARTIFACTS = REPO / "test-artifacts" / "browser"
TIMEOUT_MS = 180_000

need_browser()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A cache folder with the stand-in demo, and files for the upload tests."""
    from demo import base_model_path
    from tests import factories
    from tests.app_fixtures import make_standin_demo

    root = tmp_path_factory.mktemp("browser")
    make_standin_demo(root / "cache" / "demo")
    _warm_cache(root / "cache", "demo:full-ft")
    adapter = factories.make_lora_adapter(base_model_path(), root / "my-adapter", r=4, seed=11, factor_std=0.3)
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    corrupt = root / "corrupt" / "adapter_model.safetensors"
    corrupt.parent.mkdir()
    corrupt.write_bytes(weights[: len(weights) // 3])
    return {"cache": root / "cache", "adapter": adapter, "corrupt": corrupt, "log": root / "streamlit.log"}


def _warm_cache(cache: Path, spec: str) -> None:
    """Analyse ``spec`` into the server's spectrum cache beforehand.

    The full fine-tune is the slow one (36 MiniLM matrices); with its spectra cached the
    first page load stays quick even on a busy 2-core CI machine, while the LoRA stand-ins
    are still analysed live (progress bars, results appearing as they come).
    """
    from analysis.cache import SpectrumCache
    from analysis.pipeline import analyse_plan
    from analysis.specs import SpecResolver
    from hosting.uploads import UploadStore

    resolver = SpecResolver(uploads=UploadStore(cache / "uploads"), demo_root=cache / "demo")
    for _ in analyse_plan(resolver.plan("demo:base", spec), cache=SpectrumCache(cache / "spectra")):
        pass


@pytest.fixture(scope="module")
def server(files: dict[str, Path]) -> Iterator[str]:
    with streamlit_server({"WSE_CACHE_DIR": str(files["cache"])}, files["log"]) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with chromium("--disable-gpu") as instance:
        yield instance


#: The script runs of each page the ``page`` fixture opened (:class:`tests.servers.ScriptRuns`).
RUNS: dict = {}


@pytest.fixture
def page(browser) -> Iterator:
    context = browser.new_context(viewport={"width": 1400, "height": 1300}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    RUNS[page] = ScriptRuns(TIMEOUT_MS).watch(page)
    yield page
    RUNS.pop(page)
    context.close()


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


#: The script run is over (the attribute Streamlit's own end-to-end tests wait on), no
#: analysis is in progress and the charts are drawn.
IDLE = f"""() => {PAGE_FINISHED}
              && document.querySelectorAll('.js-plotly-plot .main-svg').length > 0"""
SCRIPT_DONE = """() => document.querySelector('[data-testid="stApp"][data-test-script-state="notRunning"]')
                     && !document.querySelector('[data-testid="stStatusWidget"]')"""


def wait_idle(page) -> None:
    """Until the script run is over, nothing is computing, and charts are drawn.

    Checked twice 0.4 s apart: a finished run may schedule another (the progress poll).
    """
    while True:
        page.wait_for_function(IDLE, timeout=TIMEOUT_MS)
        page.wait_for_timeout(400)
        if page.evaluate(IDLE):
            return


def wait_page(page, title: str, *, charts: bool = True) -> None:
    page.get_by_role("heading", name=title, exact=True).wait_for()
    if charts:
        wait_idle(page)
    else:
        page.wait_for_function(SCRIPT_DONE)


def go_to(page, link: str, title: str, *, charts: bool = True) -> float:
    """Click a page in the sidebar navigation; return seconds until it is drawn."""
    start = time.perf_counter()
    page.get_by_test_id("stSidebar").get_by_test_id("stPageLink-NavLink").filter(has_text=link).first.click()
    wait_page(page, title, charts=charts)
    return time.perf_counter() - start


def upload(page, paths: list[Path]) -> None:
    """Choose ``paths`` in the Models page's uploader and wait until the server has them.

    The names must show inside the uploader itself (the page may name the same files
    elsewhere), and the rerun that hands the files to the script must be over, before a
    button may use them. The names show as soon as the files are chosen, before they are
    uploaded, and nothing on the page changes when that rerun ends: its end is read off
    the page's websocket (:class:`tests.servers.ScriptRuns`).
    """
    runs = RUNS[page]
    chosen = runs.mark()
    uploader = page.get_by_test_id("stFileUploader")
    uploader.get_by_test_id("stFileUploaderDropzoneInput").set_input_files([str(p) for p in paths])
    for path in paths:
        uploader.get_by_text(path.name).first.wait_for()
    runs.wait(page, chosen)


def chart_titles(page) -> list[str]:
    """The titles of the charts on the page, top to bottom (SVG text has no innerText)."""
    return page.locator(".js-plotly-plot .gtitle").evaluate_all("els => els.map(e => e.textContent)")


def chart_text(page, index: int = 0) -> str:
    """All text drawn in one chart (titles, axes, legend)."""
    return page.locator(".js-plotly-plot").nth(index).evaluate("e => e.textContent")


def all_chart_text(page) -> str:
    """The text of every chart on the page (the overview draws a panel per fine-tune)."""
    return "".join(page.locator(".js-plotly-plot").evaluate_all("els => els.map(e => e.textContent)"))


def choose(page, label: str, option: str) -> None:
    """Pick ``option`` in the sidebar selectbox called ``label``; return once the run it
    asks for is over (until the server answers, the page is still the last run's, finished)."""
    runs = RUNS[page]
    chosen = runs.mark()
    box = page.get_by_test_id("stSidebar").get_by_test_id("stSelectbox").filter(has_text=label)
    box.get_by_role("combobox").click()
    page.keyboard.type(option)  # long lists are virtualised: filter down to the option
    page.get_by_role("option", name=option, exact=True).click()
    runs.wait(page, chosen)


PAGES = [
    ("Singular-vector similarity", "Singular-vector similarity"),
    ("Intruders vs ε", "Intruder dimensions vs ε"),
    ("Effective rank", "Effective rank of the updates"),
    ("Spectrum", "Spectrum"),
    ("Subspace similarity", "Subspace similarity"),
    ("Overview", "Overview"),
]


def test_page_urls_open_directly(server: str, page) -> None:
    """Seen in the browser: /overview (the default page, which Streamlit serves at "/")
    answered "Page not found". Every page's own URL opens that page, the overview's too."""
    for path, title in (("overview", "Overview"), ("intruders", "Intruder dimensions vs ε"),
                        ("series", "Checkpoint series"), ("models", "Models")):  # fmt: skip
        page.goto(f"{server}/{path}")
        wait_page(page, title, charts=False)
        page.wait_for_timeout(300)
        assert page.get_by_text("Page not found").count() == 0, path
        assert f"/{path}?" in page.url, page.url


def test_opens_on_the_demo_and_every_page_draws(server: str, page) -> None:
    page.goto(server)
    wait_page(page, "Overview")
    page.get_by_role("heading", name="Intruder dimensions (top 10, ε = 0.5)").wait_for()
    body = page.locator("[data-testid='stMain']").inner_text()
    panels = [chart_text(page, i).replace("\u200b", "") for i in range(3)]  # Plotly joins title lines with ZWSP
    titles = [
        (f"{name} (stand-in)", method)
        for name, method in (("Full FT", "full FT"), ("LoRA r=1", "LoRA r=1"), ("LoRA r=8", "LoRA r=8"))
    ]
    for panel, (label, method) in zip(panels, titles, strict=True):
        # Each panel titled with the fine-tune; how it was trained is not said twice.
        assert label in panel and panel.lower().count(method.lower()) == 1, (label, panel)
    assert "Per fine-tune totals" in body
    shot(page, "01-overview-demo")
    for number, (link, title) in enumerate(PAGES, start=2):
        go_to(page, link, title)
        assert page.locator(".js-plotly-plot").count() >= 1, link
        assert not page.get_by_test_id("stException").count(), link
        shot(page, f"{number:02d}-{title.lower().replace(' ', '-').replace('ε', 'eps')}")
    go_to(page, "Models", "Models", charts=False)
    assert page.get_by_text("Offline demo").count()
    shot(page, "08-models")


#: Where the row labelled ``layer`` and the column labelled ``module`` cross in an overview
#: panel, in page pixels: the row from the drawn tick label itself, the column from the
#: axis' own tick values (its labels are rotated).
CELL_AT = """([gd, layer, module]) => {
    const label = [...gd.querySelectorAll('.yaxislayer-above .ytick text')].find(t => t.textContent === layer);
    const row = label.getBoundingClientRect();
    const xa = gd._fullLayout.xaxis;
    const x = xa.tickvals[xa.ticktext.indexOf(module)];
    const box = gd.getBoundingClientRect();
    return [box.left + xa._offset + xa.l2p(x), row.top + row.height / 2];
}"""
DEMO_PANELS = [("demo:full-ft", "Full FT (stand-in)"), ("demo:lora-r1", "LoRA r=1"), ("demo:lora-r8", "LoRA r=8")]


def hover_at(page, panel: int, layer: str, module: str) -> tuple[float, float, str]:
    gd = page.locator(".js-plotly-plot").nth(panel)
    hover = gd.locator(".hoverlayer .hovertext").first
    page.mouse.move(1, 1)  # away first: the last cell's hover must not be read for this one
    hover.wait_for(state="detached")
    x, y = page.evaluate(CELL_AT, [gd.element_handle(), layer, module])
    page.mouse.move(x, y)
    hover.wait_for()
    return x, y, hover.evaluate("e => e.textContent")


@pytest.mark.parametrize("panel", range(len(DEMO_PANELS)))
def test_every_overview_panel_maps_its_labels_to_the_right_matrix(server: str, page, panel: int) -> None:
    """The upside-down bug: in every panel of a multi-fine-tune overview, the cell at the row
    labelled ``layer`` and the column labelled ``module`` names that matrix in its hover,
    and a click on it opens that matrix."""
    page.goto(server)
    wait_page(page, "Overview")
    spec, _ = DEMO_PANELS[panel]
    for layer in ("0", "5", "2"):
        x, y, text = hover_at(page, panel, layer, "value")
        assert f"encoder.layer.{layer}.attention.self.value.weight" in text, (panel, layer, text)
        assert f"L{layer} value" in text
    page.mouse.click(x, y)  # the last one: layer 2
    wait_page(page, "Singular-vector similarity")
    name = "encoder.layer.2.attention.self.value.weight"
    assert f"model={quote(spec)}" in page.url and f"matrix={name}" in page.url
    assert name in chart_titles(page)[0]
    shot(page, f"09-clicked-cell-panel-{panel}")


def test_overview_on_a_phone_shows_one_full_width_panel_per_row(server: str, browser) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server)
    wait_page(page, "Overview")
    boxes = [page.locator(".js-plotly-plot").nth(i).bounding_box() for i in range(len(DEMO_PANELS))]
    assert all(box["width"] > 300 for box in boxes), boxes  # no slivers
    assert all(a["y"] + a["height"] <= b["y"] + 1 for a, b in zip(boxes, boxes[1:], strict=False)), boxes  # stacked
    shot(page, "20-overview-390px")
    context.close()


def test_shared_url_reproduces_the_view_in_a_fresh_browser(server: str, page, browser) -> None:
    page.goto(server)
    wait_page(page, "Overview")
    go_to(page, "Spectrum", "Spectrum")
    choose(page, "Fine-tune", "LoRA r=8 (stand-in)")
    wait_idle(page)
    choose(page, "Matrix", "layer 3 · value")
    wait_idle(page)
    thumb = page.get_by_test_id("stSidebar").get_by_role("slider").first
    for k in (9, 8, 7):
        moved = RUNS[page].mark()
        thumb.focus()
        thumb.press("ArrowLeft")
        # The address changes as the run sets it, which may be before the page shows that
        # run as running: its end is the run's own.
        page.wait_for_function(f"() => window.location.search.includes('k={k}&')")
        RUNS[page].wait(page, moved)
        wait_idle(page)
    wait_idle(page)
    title = chart_titles(page)[0]
    assert title.startswith("LoRA r=8 (stand-in): L3 value") and "encoder.layer.3.attention.self.value.weight" in title
    assert "in the top 7 at ε = 0.5" in title
    shot(page, "10-shared-view-original")
    shared = page.url
    assert "/spectrum?" in shared

    fresh = browser.new_context(viewport={"width": 1400, "height": 1000})
    other = fresh.new_page()
    other.set_default_timeout(TIMEOUT_MS)
    other.goto(shared)
    wait_page(other, "Spectrum")
    assert chart_titles(other)[0] == title
    assert other.url == shared  # the new session's selection is the shared one, part for part
    shot(other, "11-shared-view-fresh-browser")
    fresh.close()


def test_upload_an_adapter_then_a_corrupt_file(server: str, page, files: dict[str, Path]) -> None:
    page.goto(server)
    wait_page(page, "Overview")
    go_to(page, "Models", "Models", charts=False)
    adapter = files["adapter"]
    upload(page, [adapter / "adapter_config.json", adapter / "adapter_model.safetensors"])
    page.get_by_role("button", name="Add the upload as a fine-tune").click()
    page.get_by_text("Added upload PEFT adapter [").wait_for()
    understood = page.get_by_text("PEFT LoRA adapter, r = 4, α = 8 · 12 matrices matched")
    understood.wait_for()
    shot(page, "12-upload-understood")
    page.get_by_role("button", name="Analyse").click()
    page.get_by_text(re.compile(r"upload PEFT adapter \[\w+\]: 12 matrices[.;]")).wait_for()
    go_to(page, "Overview", "Overview")
    assert "upload PEFT adapter" in all_chart_text(page)  # its own overview panel
    assert "tuned=upload:" in unquote(page.url)
    shot(page, "13-upload-overview")
    go_to(page, "Spectrum", "Spectrum")
    choose(page, "Fine-tune", next(t for t in page_options(page, "Fine-tune") if t.startswith("upload ")))
    wait_idle(page)
    assert chart_titles(page)[0].startswith("upload PEFT adapter")
    shot(page, "14-upload-spectrum")

    go_to(page, "Models", "Models", charts=False)
    upload(page, [files["corrupt"]])
    page.get_by_role("button", name="Add the upload as a fine-tune").click()
    error = page.get_by_text("Upload refused: adapter_model.safetensors: is truncated")
    error.wait_for()
    shot(page, "15-corrupt-upload-refused")
    # The app keeps working: every chosen model is still there and the charts draw.
    go_to(page, "Intruders vs ε", "Intruder dimensions vs ε")
    legend = chart_text(page)
    assert "upload PEFT adapter" in legend and "LoRA r=8 (stand-in)" in legend
    shot(page, "16-after-corrupt-upload")


@pytest.fixture(scope="module")
def slow_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A Llama-shaped base (4 blocks of 1024-wide matrices) and a full fine-tune of it:
    28 matrices that take the engine several seconds, time enough to press Cancel."""
    from tests import factories

    root = tmp_path_factory.mktemp("slow")
    shape = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4}
    heads = {"num_attention_heads": 16, "num_key_value_heads": 16}
    base = factories.make_llama(root / "base-llama", seed=3, **shape, **heads)
    return base, factories.make_full_finetune(base, root / "tuned-llama", seed=4)


def test_cancel_stops_an_analysis_and_a_rerun_finishes_it(server: str, page, files, slow_pair) -> None:
    """Cancel in the browser: the running analysis stops part way, says so, loses nothing
    (the matrices done are cached, and pressing Analyse again computes only the rest)."""
    base, tuned = slow_pair

    def pair_entries() -> int:
        return len(list((files["cache"] / "spectra").glob("v*/pair/*/*.safetensors")))

    before = pair_entries()
    page.goto(f"{server}/models?base={quote(str(base))}&tuned={quote(str(tuned))}")  # a shared link
    wait_page(page, "Models", charts=False)
    page.get_by_text(re.compile(r"28 matrices matched")).wait_for()
    page.get_by_role("button", name="Analyse").click()
    # At least one matrix done: the job shows "0 of 28" as it starts (hosting.jobs reports
    # Progress(0, total) before the first matrix), and Cancel then leaves nothing cached.
    page.get_by_text(re.compile(r"tuned-llama: [1-9]\d* of 28 matrices")).wait_for()
    shot(page, "17-analysis-running")
    page.get_by_role("button", name="Cancel").click()
    page.get_by_text(re.compile(r"tuned-llama: cancelled\.")).wait_for()
    shot(page, "18-analysis-cancelled")
    assert not page.get_by_test_id("stProgress").count()
    assert not page.get_by_text(re.compile(r"tuned-llama: 28 matrices[.;]")).count()
    done = pair_entries() - before
    assert 0 < done < 28  # stopped part way; what was finished is kept

    page.get_by_role("button", name="Analyse").click()  # again: the cached matrices are not redone
    page.get_by_text(re.compile(r"tuned-llama: 28 matrices[.;]")).wait_for()
    assert pair_entries() - before == 28
    shot(page, "19-analysis-rerun-finished")
    go_to(page, "Overview", "Overview")
    assert "tuned-llama" in all_chart_text(page)


def page_options(page, label: str) -> list[str]:
    box = page.get_by_test_id("stSidebar").get_by_test_id("stSelectbox").filter(has_text=label)
    box.get_by_role("combobox").click()
    page.get_by_role("option").first.wait_for()  # the list is open (all_inner_texts does not wait)
    options = page.get_by_role("option").all_inner_texts()
    page.keyboard.press("Escape")
    return options


def test_json_report_downloads(server: str, page) -> None:
    page.goto(server)
    wait_page(page, "Overview")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download JSON report").click()
    report = json.loads(Path(download.value.path()).read_text())
    assert report["base"] == "demo:base" and report["top_k"] == 10
    assert [m["source"] for m in report["models"]] == ["demo:full-ft", "demo:lora-r1", "demo:lora-r8"]
    assert [len(m["matrices"]) for m in report["models"]] == [36, 12, 12]
    eps = report["epsilons"].index(0.5)
    assert sum(m["intruders"][eps] for m in report["models"][2]["matrices"]) == 96  # r = 8 in each of 12


def test_html_report_downloads_and_opens_offline(server: str, page, browser, tmp_path: Path) -> None:
    from tests.test_html_report import open_offline

    page.goto(server)
    wait_page(page, "Overview")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download HTML report").click()
    assert download.value.suggested_filename == "weight-spectrum-report.html"
    path = tmp_path / "report.html"
    download.value.save_as(path)
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and "demo:lora-r8" in text
    report, context, left, errors = open_offline(browser, path, width=390)
    try:
        assert left == [] and errors == []
        # 3 fine-tunes at k = 10, eps = 0.5, and the RL vs SFT section's chart
        assert report.locator(".chart").count() == 1 + 2 * 3 + 3 + 2 * 3 * 3 + 1
        intruders = report.locator('#totals tr[data-spec="demo:lora-r8"] [data-key="intruders"]').inner_text()
        assert intruders == "96"  # as the JSON report: r = 8 in each of 12
        digests = report.locator("#provenance tbody tr td:nth-child(5)").all_inner_texts()
        assert len(digests) == 4 and all(re.fullmatch(r"[0-9a-f]{64}", d) for d in digests)
    finally:
        context.close()


def test_cached_views_redraw_in_about_a_second(server: str, page) -> None:
    page.goto(server)
    wait_page(page, "Overview")
    timings: dict[str, list[float]] = {"switch page": [], "change eps": []}
    for _ in range(3):
        timings["switch page"].append(go_to(page, "Spectrum", "Spectrum"))
        timings["switch page"].append(go_to(page, "Overview", "Overview"))
    thumb = page.get_by_test_id("stSidebar").get_by_role("slider").nth(1)
    heading = "() => document.querySelector('[data-testid=stMain] h3')?.textContent"
    for key in ("ArrowLeft", "ArrowRight", "ArrowLeft"):
        before = page.evaluate(heading)
        start = time.perf_counter()
        thumb.focus()
        thumb.press(key)
        page.wait_for_function(
            "old => document.querySelector('[data-testid=stMain] h3')?.textContent !== old", arg=before
        )
        wait_idle(page)
        timings["change eps"].append(time.perf_counter() - start)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "timings.json").write_text(json.dumps(timings, indent=1))
    print("cached re-render timings (s):", json.dumps(timings))
    assert max(timings["switch page"]) < 5 and max(timings["change eps"]) < 5
