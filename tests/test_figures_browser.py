"""Figures drawn by plotly.js itself in headless Chromium, where only the browser knows
where a label lands: the spectrum chart's intruder labels ("#2") must sit inside the plot,
not be cut at its top edge (Plotly clips a scatter's text at the axes), and the series
trends' long legend must stay off the step axis' titles."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
import pytest

from analysis.results import ModelResult
from charts import overview, series, series_tables, spectra
from tests.servers import chromium, need_browser
from tests.test_figures import lora_model  # noqa: F401 (fixture)

need_browser()

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    """One Chromium for the module's figures (each test opens its own page): a launch per
    figure was most of these tests' time."""
    with chromium("--disable-gpu") as instance:
        yield instance


#: The spectrum drawn: both intruder labels (the plot area comes from plotly.js's own layout,
#: which every template has; the plot's background rectangle is not drawn under every one).
DRAWN = "() => document.querySelectorAll('.scatterlayer .textpoint text').length >= 2"
#: Each intruder label's box and the plot area's, in page pixels, as drawn.
BOXES = """() => {
  const gd = document.querySelector('.js-plotly-plot'), at = gd.getBoundingClientRect(), s = gd._fullLayout._size;
  const labels = [...document.querySelectorAll('.scatterlayer .textpoint text')].map(t => {
    const b = t.getBoundingClientRect();
    return {text: t.textContent, top: b.top, bottom: b.bottom, left: b.left, right: b.right};
  });
  const plot = {top: at.top + s.t, bottom: at.top + s.t + s.h, left: at.left + s.l, right: at.left + s.l + s.w};
  return {plot, labels};
}"""


@pytest.mark.parametrize("template", ["plotly", "streamlit"])
@pytest.mark.parametrize("width", [1400, 390])
def test_spectrum_intruder_labels_are_inside_the_plot(
    lora_model: ModelResult,  # noqa: F811
    width: int,
    template: str,
    tmp_path: Path,
    browser,
) -> None:
    """Under plotly's template and Streamlit's (the dashboard's; importing Streamlit's chart
    element makes it the default, so the suite's order decided which one a run drew)."""
    from streamlit.elements import plotly_chart  # noqa: F401 - registers the "streamlit" template

    matrix = next(m for m in lora_model.matrices if m.module == "query" and m.layer == 0)
    fig = spectra.spectrum_figure(matrix, 10, 0.5, label="LoRA run")
    fig.update_layout(template=pio.templates[template])
    html = tmp_path / "spectrum.html"
    fig.write_html(html, include_plotlyjs=True, full_html=True, default_width="100%")
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.goto(html.as_uri())
    page.wait_for_function(DRAWN)
    boxes = page.evaluate(BOXES)
    page.close()
    plot, labels = boxes["plot"], boxes["labels"]
    assert sorted(label["text"] for label in labels) == ["#1", "#2"]  # the two planted intruders
    for label in labels:
        assert label["top"] >= plot["top"] - 0.5, (label, plot)  # not cut at the top edge
        assert label["bottom"] <= plot["bottom"] + 0.5 and label["right"] <= plot["right"] + 0.5, (label, plot)


#: The legend's box and those of the "training step" axis titles, in page pixels.
LEGEND_AND_TITLES = """() => ({
  legend: document.querySelector('.legend').getBoundingClientRect().top,
  titles: [...document.querySelectorAll('text')].filter(t => t.textContent === 'training step')
    .map(t => t.getBoundingClientRect().bottom),
})"""


@pytest.mark.parametrize("width", [1400, 358])  # 358: the chart's width on a 390 px phone
def test_series_legend_stays_below_the_step_titles(
    lora_model: ModelResult,  # noqa: F811
    width: int,
    tmp_path: Path,
    browser,
) -> None:
    """Per matrix the legend is long; at 15 % of the plot below it, it sat on the "training
    step" titles once it had shrunk the plot (a phone)."""
    six = [  # six layers of the fixture's matrices: 24 lines, as long a legend as a small model's
        replace(m, id=replace(m.id, layer=layer, name=m.name.replace(f".{m.layer}.", f".{layer}.")))
        for layer in range(6)
        for m in lora_model.matrices
        if m.layer == 0
    ]
    models = [replace(lora_model, matrices=six, step=step) for step in (10, 20, 30, 40, 50, 60)]
    fig = series.series_trend_figure(series_tables.series_table(models, 10, 0.5, "matrix"), "matrix", "LoRA run")
    html = tmp_path / "series.html"
    fig.write_html(html, include_plotlyjs=True, full_html=True, default_width="100%")
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.goto(html.as_uri())
    page.wait_for_function(  # drawn in full (plotly.js draws in steps)
        "() => document.querySelector('.legend') && "
        "[...document.querySelectorAll('text')].filter(t => t.textContent === 'training step').length >= 2"
    )
    boxes = page.evaluate(LEGEND_AND_TITLES)
    page.close()
    assert len(boxes["titles"]) == 2, boxes
    assert boxes["legend"] >= max(boxes["titles"]), boxes


#: The series grid's colour bar as drawn: its title, its bar, its tick labels; the plot area, the
#: grid's module names and the figure, in page pixels.
COLOUR_BAR = """() => {
  const box = e => {
    const b = e.getBoundingClientRect();
    return {top: b.top, bottom: b.bottom, left: b.left, right: b.right};
  };
  const gd = document.querySelector('.js-plotly-plot'), at = gd.getBoundingClientRect(), s = gd._fullLayout._size;
  return {
    figure: box(gd),
    plot: {top: at.top + s.t, bottom: at.top + s.t + s.h, left: at.left + s.l, right: at.left + s.l + s.w},
    title: box(document.querySelector('.colorbar .cbtitle text')),
    bar: box(document.querySelector('.colorbar .cbfill')),
    ticks: [...document.querySelectorAll('.colorbar .cbaxis text')]
      .map(box),
    modules: [...document.querySelectorAll('.xtick text')].map(box),
  };
}"""


def _apart(a: dict, b: dict) -> bool:
    """Two boxes that do not overlap (touching edges allowed)."""
    return (
        a["right"] <= b["left"] + 0.5
        or b["right"] <= a["left"] + 0.5
        or (a["bottom"] <= b["top"] + 0.5 or b["bottom"] <= a["top"] + 0.5)
    )


#: Six module names as a Llama's: long, so a phone slants them under the grid.
LONG_MODULES = (
    ("self_attn.q_proj", "self_attn.v_proj"),
    ("self_attn.k_proj", "self_attn.o_proj"),
    ("mlp.gate_proj", "mlp.down_proj"),
)


def _grid_models(model: ModelResult, layers: int | str) -> list[ModelResult]:
    """Two checkpoints (or fine-tunes) of ``layers`` layers of the fixture's query and value
    (``"2, long module names"``: two layers of six modules named as a Llama's)."""
    long = isinstance(layers, str)
    first = [m for m in model.matrices if m.layer == 0]  # query and value
    renamed = [(m, names[i]) for names in LONG_MODULES for i, m in enumerate(first)] if long else None
    matrices = [
        replace(m, id=replace(m.id, layer=layer, name=m.name.replace(f".{m.layer}.", f".{layer}."), module=module))
        for layer in range(2 if long else layers)
        for m, module in (renamed or [(m, m.module) for m in first])
    ]
    return [replace(model, matrices=matrices, source=f"s{step}", step=step) for step in (10, 20)]


def _series_grids(models: list[ModelResult]) -> list[tuple[str, go.Figure]]:
    """The series page's grids (:func:`charts.series.series_grid_figure`), one figure per metric."""
    return [
        (
            metric,
            series.series_grid_figure(series_tables.series_grid_table(models, metric, 10, 0.5), metric, "LoRA run"),
        )
        for metric in ("intruders", "delta_fro")
    ]


def _overview_grids(models: list[ModelResult]) -> list[tuple[str, go.Figure]]:
    """The overview's and the RL-versus-SFT page's grids (:func:`charts.overview.overview_sections`):
    the first fine-tune's panel, for a count, the overview's rank and the RL page's measures
    (the longest title: "Intruder energy share (share, 0–1)")."""
    return [
        (metric, overview.overview_sections(models, metric, 10, 0.5)[0].panels[0])
        for metric in ("intruders", "rank90", "intruder_energy_share")
    ]


@pytest.mark.parametrize("grids", [_series_grids, _overview_grids], ids=["series", "overview"])
@pytest.mark.parametrize(
    ("layers", "template"),
    [(6, "streamlit"), (3, "streamlit"), (2, "streamlit"), (1, "streamlit"), ("2, long module names", "streamlit"),
     ("2, long module names", "plotly")],  # plotly's: larger tick labels
)  # fmt: skip
# 358: the chart's width on a 390 px phone; 300: an overview panel's, three side by side at 1400 px
@pytest.mark.parametrize("width", [1400, 358, 300])
def test_grid_colour_bar_title_fits_its_bar(
    lora_model: ModelResult,  # noqa: F811
    grids,
    layers: int | str,
    template: str,
    width: int,
    tmp_path: Path,
    browser,
) -> None:
    """QA 2026-12-07: upright beside a grid of few layers, the bar was shorter than its title
    ("Intruder dimensions (count)", turned along it), which ran past both its ends (the demo's
    6 layers at 390 px on the series page; 2-3 layers on the overview and RL pages, where a
    358 px panel drew a 122 px title beside an 88 px bar). Now the title is no longer than the
    bar along it, stays inside the figure and off the grid, its module names (slanted ones
    too, none cut at the figure's edge) and the bar's own tick labels; the bar stays inside
    the figure."""
    from streamlit.elements import plotly_chart  # noqa: F401 - registers the "streamlit" template

    for metric, fig in grids(_grid_models(lora_model, layers)):
        fig.update_layout(template=pio.templates[template])
        html = tmp_path / f"grid-{metric}.html"
        fig.write_html(html, include_plotlyjs=True, full_html=True, default_width="100%")
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(html.as_uri())
        page.wait_for_function("() => document.querySelector('.colorbar .cbtitle text') !== null")
        page.wait_for_timeout(300)
        b = page.evaluate(COLOUR_BAR)
        page.close()
        title, bar, figure = b["title"], b["bar"], b["figure"]
        upright = bar["bottom"] - bar["top"] > bar["right"] - bar["left"]
        along = (title["bottom"] - title["top"], bar["bottom"] - bar["top"]) if upright else (
            title["right"] - title["left"], bar["right"] - bar["left"])  # fmt: skip
        print(grids.__name__, layers, template, width, metric, "title", round(along[0], 1), "bar", round(along[1], 1))
        assert along[0] <= along[1] + 0.5, (metric, "title longer than its bar", along)
        assert figure["left"] <= title["left"] and title["right"] <= figure["right"], (metric, title, figure)
        assert figure["top"] <= title["top"] and title["bottom"] <= figure["bottom"], (metric, title, figure)
        assert figure["left"] <= bar["left"] and bar["right"] <= figure["right"], (metric, bar, figure)
        assert figure["top"] <= bar["top"] and bar["bottom"] <= figure["bottom"], (metric, bar, figure)
        for other in [b["plot"], bar, *b["modules"], *b["ticks"]]:
            assert _apart(title, other), (metric, title, other)
        assert _apart(bar, b["plot"]) and all(_apart(bar, m) for m in b["modules"]), (metric, bar)
        for name in b["modules"]:  # inside the figure, none cut at its edge
            assert figure["left"] <= name["left"] and name["right"] <= figure["right"] + 0.5, (metric, name)
        ticks = b["ticks"]
        assert ticks and all(_apart(p, q) for i, p in enumerate(ticks) for q in ticks[i + 1 :]), (metric, ticks)
