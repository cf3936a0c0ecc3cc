"""The HTML report (``python -m analysis report --html``): one file, offline, in a real browser.

The command line runs on tiny real models; the file is opened in headless Chromium with
every request that would leave the page aborted and recorded. Every chart must draw, the
totals on the page must be the JSON report's, the dark scheme must recolour the figures,
and a 390 px screen must not scroll sideways. Its provenance (stored dtypes, content
digests) is checked against the files, and its size on a 7B-shaped comparison.
"""

from __future__ import annotations

import json
import re
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from analysis.cache import SpectrumCache
from analysis.compare import compare
from analysis.identity import MatrixId
from analysis.provenance import comparison_provenance, stored_dtypes
from analysis.results import DEFAULT_EPSILONS, ComparisonResult, MatrixResult, ModelResult
from analysis.specs import SpecResolver
from charts import colors
from charts.html_report import changed_most, html_report
from cli import main
from tests.servers import CHROMIUM, need_browser
from tests.test_cli import run_cli

REPO = Path(__file__).resolve().parent.parent
HEX64 = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    sync_api = need_browser()
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-background-networking"]
        )
        yield instance
        instance.close()


def open_offline(browser, path: Path, *, width: int = 1400, scheme: str = "light"):
    """Open ``path`` with every request but the file itself aborted; returns (page, context, left, errors)."""
    context = browser.new_context(viewport={"width": width, "height": 900}, color_scheme=scheme)
    page = context.new_page()
    left: list[str] = []
    errors: list[str] = []

    def route(request_route) -> None:
        url = request_route.request.url
        if url.split(":", 1)[0] in ("file", "data", "about", "blob"):
            request_route.continue_()
        else:
            left.append(url)
            request_route.abort()

    page.route("**/*", route)
    page.on(
        "request", lambda r: None if r.url.startswith(("file:", "data:", "about:", "blob:")) else left.append(r.url)
    )
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    wait_until(
        page, "document.querySelectorAll('.chart').length === document.querySelectorAll('.js-plotly-plot').length"
    )
    return page, context, left, errors


def wait_until(page, condition: str, timeout_s: float = 30) -> None:
    """Poll ``condition`` with ``page.evaluate`` (the page's CSP forbids the eval ``wait_for_function`` needs)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(condition):
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        page.wait_for_timeout(100)


@pytest.fixture(scope="module")
def reports(tmp_path_factory, tiny_bert, tiny_bert_full_ft, tiny_bert_lora) -> dict[str, Path]:
    """``python -m analysis report ... --out report.json --html report.html`` in a real process."""
    root = tmp_path_factory.mktemp("html-report")
    proc = run_cli(
        "report", str(tiny_bert), str(tiny_bert_full_ft), str(tiny_bert_lora),
        "--out", str(root / "report.json"), "--html", str(root / "report.html"),
        "--epsilons", "0.1,0.5,0.9", "--eps", "0.5", "--cache-dir", str(root / "cache"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "report.html" in proc.stderr and "MiB" in proc.stderr
    return {"json": root / "report.json", "html": root / "report.html"}


def test_html_report_opens_offline_and_shows_the_json_numbers(browser, reports, tiny_bert) -> None:
    report = json.loads(reports["json"].read_text())
    page, context, left, errors = open_offline(browser, reports["html"])
    try:
        assert left == [] and errors == []
        charts = page.locator(".chart").count()
        # totals, 2 overview metrics x 2 fine-tunes (one grid), sweep, effective rank, rank90, the RL vs SFT
        # sparsity bars, 3 x 2 per fine-tune
        assert charts == 1 + 2 * 2 + 3 + 1 + 2 * 3 * 2
        assert page.locator(".js-plotly-plot .main-svg").first.is_visible()
        assert page.evaluate("document.querySelectorAll('.js-plotly-plot').length") == charts
        eps_index = report["epsilons"].index(0.5)
        for model in report["models"]:
            row = page.locator(f'#totals tr[data-spec="{model["source"]}"]')
            intruders = row.locator('[data-key="intruders"]')
            assert int(intruders.inner_text()) == model["totals"]["intruders"][eps_index]
            erank = row.locator('[data-key="mean_effective_rank"]')
            assert erank.inner_text() == f"{model['totals']['mean_effective_rank']:.2f}"
            assert float(erank.get_attribute("data-value")) == pytest.approx(model["totals"]["mean_effective_rank"])
            assert int(row.locator('[data-key="matrices"]').inner_text()) == len(model["matrices"])
        settings = page.locator("#settings").inner_text()
        version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
        assert f"Weight Spectrum Explorer {version}" in settings and str(tiny_bert) in settings
        assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", settings)  # the date
        provenance = page.locator("#provenance tbody tr")
        assert provenance.count() == 3  # base and two fine-tunes
        for i in range(3):
            cells = provenance.nth(i).locator("td")
            assert "fp32" in cells.nth(2).inner_text()
            assert HEX64.match(cells.nth(4).inner_text())
        assert "plotly.js" in page.locator("#provenance ~ p").last.inner_text()
    finally:
        context.close()


def test_html_report_follows_dark_mode_and_fits_a_phone(browser, reports) -> None:
    page, context, left, errors = open_offline(browser, reports["html"], width=390, scheme="dark")
    try:
        assert left == [] and errors == []
        backgrounds = page.evaluate(
            "[...document.querySelectorAll('.js-plotly-plot')].map(d => d._fullLayout.paper_bgcolor)"
        )
        assert set(backgrounds) == {"rgb(17,17,17)"}  # plotly_dark's
        assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(17, 17, 17)"
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        widths = page.evaluate("[...document.querySelectorAll('.js-plotly-plot')].map(d => d._fullLayout.width)")
        assert max(widths) <= 390
        page.emulate_media(color_scheme="light")  # the reader switches: the figures follow
        wait_until(page, "document.querySelector('.js-plotly-plot')._fullLayout.paper_bgcolor === 'white'")
        backgrounds = page.evaluate(
            "[...document.querySelectorAll('.js-plotly-plot')].map(d => d._fullLayout.paper_bgcolor)"
        )
        assert set(backgrounds) == {"white"}
    finally:
        context.close()


# Where the zero cell and the top cell of the intruder grids are drawn, in the page's coordinates,
# their values, the colour axis' ends and the cell text colour on each.
_GRID_CELLS = """() => {
  const out = [];
  document.querySelectorAll('[id^="grid-intruders-"]').forEach(div => {
    const heat = div._fullData.find(t => t.type === 'heatmap'), ax = div._fullLayout.coloraxis;
    const words = div._fullData.find(t => t.meta && t.meta.role === 'cell-text');
    const xa = div._fullLayout.xaxis, ya = div._fullLayout.yaxis;
    const width = Math.abs(xa.l2p(1) - xa.l2p(0)), height = Math.abs(ya.l2p(1) - ya.l2p(0));
    heat.z.forEach((row, i) => row.forEach((value, j) => {
      if (value === null || Number.isNaN(value)) { return; }
      const text = words ? words.textfont.color[words.x.findIndex((x, n) => x === j && words.y[n] === i)] : null;
      out.push({id: div.id, value: value, cmin: ax.cmin, cmax: ax.cmax, text: text,
                x: xa._offset + xa.l2p(j) - 0.3 * width, y: ya._offset + ya.l2p(i) - 0.3 * height});
    }));
  });
  return out;
}"""


def drawn_cells(page) -> list[dict]:
    """Each intruder-grid cell with the colour it is drawn in (read from a screenshot, off its text)."""
    from io import BytesIO

    from PIL import Image

    cells = []
    for cell in page.evaluate(_GRID_CELLS):
        div = page.locator(f"#{cell['id']}")
        div.scroll_into_view_if_needed()
        box = div.bounding_box()
        shot = Image.open(BytesIO(page.screenshot(clip={**box}))).convert("RGB")
        r, g, b = shot.getpixel((round(cell["x"]), round(cell["y"])))
        cells.append({**cell, "drawn": f"rgb({r}, {g}, {b})"})
    return cells


def test_html_report_draws_the_dashboards_dark_scales_on_a_dark_page(browser, reports) -> None:
    """On a dark page the report kept the light scales: zero cells glaring near white, the cells
    that matter dark red at 1.36:1 against the page. Drawn as the dashboard draws them now, in
    either scheme, and again when the reader switches."""
    page, context, left, errors = open_offline(browser, reports["html"], scheme="dark")
    try:
        assert left == [] and errors == []
        for scheme in ("dark", "light", "dark"):
            if scheme != page.evaluate("matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light'"):
                page.emulate_media(color_scheme=scheme)
                wanted = colors.COLORSCALES["counts"][scheme][0]
                wait_until(
                    page, f"document.querySelector('[id^=grid-intruders-]')._fullLayout.coloraxis.colorscale[0][1]"
                    f" === '{wanted}'"
                )  # fmt: skip
            background = page.evaluate("getComputedStyle(document.body).backgroundColor")
            scale = colors.colorscale("counts", dark=scheme == "dark")
            cells = drawn_cells(page)
            zeros = [c for c in cells if c["value"] == 0]
            tops = [c for c in cells if c["value"] == c["cmax"]]
            assert zeros and tops, cells
            for cell in cells:
                expected = colors.scale_color(scale, cell["value"], cell["cmin"], cell["cmax"])
                assert colors.contrast(cell["drawn"], expected) < 1.05, (scheme, cell, expected)
                if cell["text"] is not None:  # the words on it read at WCAG AA
                    assert colors.contrast(cell["text"], cell["drawn"]) >= 4.5, (scheme, cell)
            assert max(colors.contrast(c["drawn"], background) for c in zeros) < 1.5, (scheme, zeros)
            assert min(colors.contrast(c["drawn"], background) for c in tops) >= 4.5, (scheme, tops)
            similarity = page.evaluate(
                "[...document.querySelectorAll('[id^=similarity-]')].map(d => "
                "d._fullData.find(t => t.type === 'heatmap').colorscale.map(s => s[1]))"
            )
            assert similarity and all(s == colors.COLORSCALES["similarity"][scheme] for s in similarity)
        assert errors == []
    finally:
        context.close()


def test_html_without_out_writes_only_the_html(tmp_path, tiny_bert, tiny_bert_lora, capsys) -> None:
    out = tmp_path / "out"
    code = main(
        ["report", str(tiny_bert), str(tiny_bert_lora), "--html", str(out / "r.html"),
         "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    )  # fmt: skip
    assert code == 0
    assert [p.name for p in out.iterdir()] == ["r.html"]
    text = (out / "r.html").read_text()
    assert text.startswith("<!DOCTYPE html>") and str(tiny_bert_lora) in text
    assert text.count("* plotly.js v") == 1  # embedded once

    code = main(["report", str(tiny_bert), str(tiny_bert_lora), "--quiet"])
    assert code == 2
    assert "give --out (the JSON report), --html (the HTML report) or both" in capsys.readouterr().err


def test_provenance_reports_stored_dtypes_and_stable_digests(tmp_path, tiny_llama, tiny_llama_bf16) -> None:
    cache = SpectrumCache(tmp_path / "cache")
    result = compare(str(tiny_llama), [str(tiny_llama_bf16)], cache=cache, device="cpu")
    resolver = SpecResolver(allow_local_paths=True)
    hashed_by_the_analysis = cache.fingerprints.hashed
    indexed = comparison_provenance(resolver, result, stored=cache.fingerprints.digest)
    assert cache.fingerprints.hashed == hashed_by_the_analysis  # every digest was known: nothing read again
    hashed = comparison_provenance(resolver, result)  # no index: every analysed tensor is read and hashed
    assert [m.digest for m in indexed.models] == [m.digest for m in hashed.models]
    base, tuned = indexed.models
    assert (base.role, tuned.role) == ("base", "full")
    assert set(base.dtypes) == {"fp32"} and set(tuned.dtypes) == {"bf16"}
    assert tuned.dtypes == stored_dtypes(resolver.open(str(tiny_llama_bf16)))
    assert base.matrices == tuned.matrices == len(result.models[0].matrices)
    assert base.digest != tuned.digest and all(HEX64.match(m.digest) for m in indexed.models)
    text = html_report(result, 0.5, provenance=indexed)
    assert "bf16" in text and tuned.digest in text and base.digest in text


def test_html_report_is_the_same_bytes_for_the_same_analysis_and_carries_both_scales(
    tmp_path, tiny_bert, tiny_bert_full_ft, tiny_bert_lora
) -> None:
    cache = SpectrumCache(tmp_path / "cache")
    result = compare(str(tiny_bert), [str(tiny_bert_full_ft), str(tiny_bert_lora)], cache=cache, device="cpu")
    provenance = comparison_provenance(SpecResolver(allow_local_paths=True), result, stored=cache.fingerprints.digest)
    text = html_report(result, 0.5, provenance=provenance, settings={"command": "report"})
    assert html_report(result, 0.5, provenance=provenance, settings={"command": "report"}) == text
    figures = {
        name: json.loads(body.replace("<\\/", "</"))
        for name, body in re.findall(r'<script type="application/json" data-figure="([^"]+)">(.*?)</script>', text)
    }
    grids = [f for name, f in figures.items() if name.startswith("grid-intruders-")]
    similarity = [f for name, f in figures.items() if name.startswith("similarity-")]
    assert grids and similarity
    for fig in grids:  # drawn for a light page, with the dark twin beside it: one file, both schemes
        assert [c for _, c in fig["layout"]["coloraxis"]["colorscale"]] == colors.COLORSCALES["counts"]["light"]
        dark = fig["dark"]["layout"]["coloraxis.colorscale"]
        assert [c for _, c in dark] == colors.COLORSCALES["counts"]["dark"]
    for fig in similarity:
        heat = next(i for i, t in enumerate(fig["data"]) if t["type"] == "heatmap")
        assert [c for _, c in fig["data"][heat]["colorscale"]] == colors.COLORSCALES["similarity"]["light"]
        assert [c for _, c in fig["dark"]["data"][str(heat)]["colorscale"]] == colors.COLORSCALES["similarity"]["dark"]
    assert all("dark" not in f for name, f in figures.items() if name.startswith(("sweep-", "totals-")))


# -- size on a 7B-shaped comparison ---------------------------------------------------------------
SHAPES_7B = {"query": (4096, 4096), "key": (4096, 4096), "value": (4096, 4096), "attn_out": (4096, 4096),
             "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}  # fmt: skip


def synthetic_7b(models: int, seed: int = 0) -> ComparisonResult:
    """Llama-2-7B-shaped results (32 layers, 7 matrices each, full spectra) with synthetic numbers.

    Only the sizes matter here: a full fine-tune and LoRAs, every spectrum 4096 values long
    and a 100 x 100 similarity block per matrix, as the engine keeps them.
    """
    rng = np.random.default_rng(seed)
    out = []
    for index in range(models):
        rank = None if index == 0 else 16 * index
        matrices = []
        for layer in range(32):
            for module, shape in SHAPES_7B.items():
                n = min(shape)
                base = np.sort(rng.gamma(2.0, 1.0, n))[::-1]
                similarity = rng.uniform(0, 0.2, (100, 100))
                np.fill_diagonal(similarity, 0.95)
                matrices.append(
                    MatrixResult(
                        MatrixId(f"model.layers.{layer}.{module}.weight", layer, module, shape),
                        base_singular_values=base,
                        tuned_singular_values=base * (1 + 0.01 * rng.standard_normal(n)),
                        delta_singular_values=np.sort(rng.gamma(1.0, 0.01, rank or n))[::-1],
                        intruder_scores=rng.uniform(0.2, 1.0, 100),
                        best_match=np.arange(100),
                        similarity=similarity,
                        delta_left_vectors=np.zeros((shape[0], 1), np.float16),
                        effective_rank=float(rng.uniform(1, 3000)),
                        rank90=int(rng.integers(1, 3000)),
                        stable_rank=float(rng.uniform(1, 10)),
                        delta_fro=float(rng.uniform(0.1, 5)),
                        amplification_factor=float(rng.uniform(1, 20)),
                        amplification_rank=rank or 16,
                        adapter_rank=rank,
                    )
                )
        summary = {"adapter": {"r": rank}} if rank else {}
        out.append(ModelResult(f"org/tune-{index}", "adapter" if rank else "full", matrices, summary=summary))
    return ComparisonResult("meta-llama/Llama-2-7b-hf", 10, list(DEFAULT_EPSILONS), out)


def test_a_7b_shaped_report_stays_small() -> None:
    result = synthetic_7b(models=4)
    text = html_report(result, 0.5)
    size = len(text.encode())
    charts, data_kib = map(int, re.search(r"once for all (\d+) charts, whose data take (\d+) KiB", text).groups())
    print(f"7B-shaped, 4 fine-tunes: {size / 2**20:.2f} MiB, {charts} charts, {data_kib} KiB of chart data")
    assert charts == 1 + 2 * 4 + 3 + 2 * 3 * 4
    assert data_kib < 1024 and size < 6 * 2**20  # plotly.js (about 4.6 MiB) and under 1 MiB of charts
    picked = changed_most(result.models[1], 10, 0.5)
    counts = [m.intruder_counts(10, [0.5])[0] for m in result.models[1].matrices]
    assert picked[0].intruder_counts(10, [0.5])[0] == max(counts) and len(picked) == 3
