"""What a reader of the charts sees (issue 25): axis ranges, ticks, labels, legends, colours.

On results from real small SVDs (the fixtures of tests/test_figures.py). Each test holds
one thing a user found wrong in the browser: a totals axis from -1 to 1, colour bars
ticking 0.5 for whole counts, zero cells glaring white on a dark page, unreadable cell
text, fine-tunes in a legend that draw nothing, facets with different ranges, rank axes
from 0, mixed tick notations, titles cut on a phone, exaggerated trade-off axes.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import plotly.graph_objects as go
import pytest

from analysis.results import ModelResult
from charts import (
    colors,
    comparison,
    mitigation,
    overview,
    rl_measures,
    rl_tables,
    series,
    series_tables,
    spectra,
    style,
)
from charts.table_words import MEASURES
from tests.test_figures import full_model, lora_model  # noqa: F401 (fixtures)


def _zero_model(model: ModelResult, name: str = "zero") -> ModelResult:
    """``model`` with every matrix's update equal to nothing new: the tuned spectrum's
    vectors all match the base (intruder scores 1), so no intruder at any eps."""
    matrices = [replace(m, intruder_scores=np.ones_like(m.intruder_scores)) for m in model.matrices]
    return ModelResult(**{**model.__dict__, "source": name, "matrices": matrices})


def test_totals_axis_starts_at_zero_with_whole_ticks_when_nothing_intrudes(full_model: ModelResult) -> None:
    """One fine-tune with no intruder: the axis once ran from -1 to 1 with the "0" mid-plot."""
    fig = overview.totals_figure([full_model], k=10, eps=0.5)
    assert [list(t.y) for t in fig.data] == [[0]]
    low, high = fig.layout.yaxis.range
    assert low == 0 and high >= 1
    assert fig.layout.yaxis.dtick == 1 and fig.layout.yaxis.tickformat == "d"


def test_totals_axis_holds_the_tallest_bar_and_its_label(lora_model: ModelResult, full_model: ModelResult) -> None:
    fig = overview.totals_figure([lora_model, full_model], k=10, eps=0.5)
    low, high = fig.layout.yaxis.range
    assert low == 0 and high > 3 and float(fig.layout.yaxis.dtick).is_integer()


def test_totals_legend_sits_below_the_bars(lora_model: ModelResult, full_model: ModelResult) -> None:
    """Beside the bars (Plotly's default), the legend took 40 % of a phone's width on the demo's
    overview and squeezed four bars into the rest, their names slanted."""
    fig = overview.totals_figure([lora_model, full_model], k=10, eps=0.5)
    assert fig.layout.showlegend and fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0


def test_count_colour_bars_tick_whole_numbers(lora_model: ModelResult) -> None:
    (section,) = overview.overview_sections([lora_model], "intruders", k=10, eps=0.5)
    bar = section.panels[0].layout.coloraxis.colorbar
    assert bar.tickmode == "linear" and bar.tick0 == 0 and bar.dtick == 1 and bar.tickformat == "d"
    for top in (1, 2, 7, 30, 240, 5000):
        ticks = colors.count_ticks(top)
        assert float(ticks["dtick"]).is_integer() and top / ticks["dtick"] <= 5
    (rank,) = overview.overview_sections([lora_model], "effective_rank", k=10, eps=0.5)
    assert rank.panels[0].layout.coloraxis.colorbar.dtick is None  # a measure, not a count


def test_four_fine_tunes_are_two_rows_of_two(lora_model: ModelResult, full_model: ModelResult) -> None:
    """The fourth fine-tune wrapped alone into a row of three (each a third of the width)."""
    assert [overview.panel_columns(n, 3) for n in range(1, 10)] == [1, 2, 3, 2, 3, 3, 3, 3, 3]
    (section,) = overview.overview_sections([lora_model, full_model] * 2, "intruders", k=10, eps=0.5)
    assert section.columns == 2


def test_cell_numbers_fit_small_cells_and_read_on_their_colour(lora_model: ModelResult) -> None:
    assert overview.cell_label(228.6, "effective_rank") == "229"
    assert overview.cell_label(4.93, "effective_rank") == "4.9"
    assert overview.cell_label(7.0, "intruders") == "7"
    assert max(len(overview.cell_label(v, "rank90")) for v in np.linspace(0, 9999, 500)) <= 4
    # Every cell's text, on any colour of every scale in either theme, reads at WCAG AA (4.5:1).
    for kind in colors.COLORSCALES:
        for dark in (False, True):
            scale = colors.colorscale(kind, dark)
            values = np.linspace(0, 1, 101)
            texts = colors.cell_text_colors(values, scale, 0, 1)
            worst = min(
                colors.contrast(t, colors.scale_color(scale, v, 0, 1)) for t, v in zip(texts, values, strict=True)
            )
            assert worst >= 4.5, (kind, dark, worst)


def test_rl_grids_write_their_values_in_colours_that_read(lora_model: ModelResult) -> None:
    """Coloured by an RL-versus-SFT measure, every cell said "0.0" and its words were black on
    dark purple: the text was coloured for a colour axis up to 1, the cells for one up to 0.04."""
    assert overview.cell_label(0.0437, "mask_overlap") == "0.04" and overview.cell_label(0.2059, "x") == "0.21"
    assert overview.cell_label(1.9e-4, "spectral_shift") == "2e-4" and overview.cell_label(0.0, "mask_overlap") == "0"
    assert [overview.cell_label(v, "spectral_shift") for v in (0.0096, 0.0094)] == ["0.01", "9e-3"]
    assert overview.cell_label(float("nan"), "mask_overlap") == "–" and overview.cell_label(12.6, "x") == "13"
    assert overview.overview_title("intruder_energy_share", 10, 0.5) == "Intruder energy share (top 10, ε = 0.5)"
    assert list(rl_tables.RL_MEANINGS) == list(rl_tables.RL_METRICS)  # each colour-by choice says what it is
    for metric in ("spectral_shift", "intruder_energy_share"):
        (section,) = overview.overview_sections([lora_model], metric, k=10, eps=0.5)
        fig = section.panels[0]
        words = next(t for t in fig.data if t.meta and t.meta["role"] == "cell-text")
        values = words.meta["values"]
        assert 0 < fig.layout.coloraxis.cmax == words.meta["high"] < 1, metric
        assert list(words.text) == [overview.cell_label(v, metric) for v in values]
        assert all(t != "0.0" for t in words.text) and len(set(words.text)) > 1, words.text
        for dark in (False, True):
            colors.themed(fig, dark)
            ax = fig.layout.coloraxis
            for value, text in zip(values, words.textfont.color, strict=True):
                cell = colors.scale_color(ax.colorscale, value, ax.cmin, ax.cmax)
                assert colors.contrast(text, cell) >= 4.5, (metric, dark, value, text, cell)


def test_dark_pages_get_dark_scales_where_zero_does_not_glare(lora_model: ModelResult) -> None:
    """On a dark page the zero cells were bright white and the cells that matter dark red at
    1.36:1 against the page. Each scale's low end takes the page's tone, its high end
    stands out from the page, in both themes."""
    for kind in ("counts", "similarity", "measure"):
        for theme in ("light", "dark"):
            low, high = colors.COLORSCALES[kind][theme][0], colors.COLORSCALES[kind][theme][-1]
            page = colors.PAGE_COLORS[theme]
            assert colors.contrast(low, page) < 1.5, (kind, theme)
            assert colors.contrast(high, page) >= 4.5, (kind, theme)
    (section,) = overview.overview_sections([lora_model], "intruders", k=10, eps=0.5)
    fig = section.panels[0]
    light_text = list(next(t for t in fig.data if t.meta and t.meta["role"] == "cell-text").textfont.color)
    colors.themed(fig, dark=False)
    assert [c for _, c in fig.layout.coloraxis.colorscale] == colors.COLORSCALES["counts"]["light"]
    colors.themed(fig, dark=True)
    assert [c for _, c in fig.layout.coloraxis.colorscale] == colors.COLORSCALES["counts"]["dark"]
    words = next(t for t in fig.data if t.meta and t.meta["role"] == "cell-text")
    zero = [c for c, v in zip(words.textfont.color, words.meta["values"], strict=True) if v == 0]
    assert set(zero) == {"#ffffff"} and light_text != list(words.textfont.color)  # light words on dark zeros
    sim = spectra.similarity_figure(lora_model.matrices[0], 10, 0.5)
    colors.themed(sim, dark=True)
    heat = next(t for t in sim.data if t.type == "heatmap")
    assert [c for _, c in heat.colorscale] == colors.COLORSCALES["similarity"]["dark"]


def test_dark_patch_is_what_themed_changes_and_leaves_the_figure_alone(lora_model: ModelResult) -> None:
    """The HTML report swaps its scales in the browser from this patch: it must hold exactly
    the dashboard's dark swap (scales and cell text), and nothing for a figure without a scale."""
    (section,) = overview.overview_sections([lora_model], "intruders", k=10, eps=0.5)
    fig = section.panels[0]
    before = fig.to_json()
    patch = colors.dark_patch(fig)
    assert fig.to_json() == before  # drawn for a light page still
    dark = colors.themed(go.Figure(fig), dark=True)
    words = next(i for i, t in enumerate(fig.data) if t.meta and t.meta["role"] == "cell-text")
    assert list(patch["layout"]) == ["coloraxis.colorscale"]
    assert [c for _, c in patch["layout"]["coloraxis.colorscale"]] == colors.COLORSCALES["counts"]["dark"]
    assert patch["data"] == {str(words): {"textfont.color": list(dark.data[words].textfont.color)}}
    assert patch["data"][str(words)]["textfont.color"] != list(fig.data[words].textfont.color)
    sim = spectra.similarity_figure(lora_model.matrices[0], 10, 0.5)
    heat = next(i for i, t in enumerate(sim.data) if t.type == "heatmap")
    (scale,) = colors.dark_patch(sim)["data"][str(heat)].values()
    assert [c for _, c in scale] == colors.COLORSCALES["similarity"]["dark"]
    sweep = comparison.sweep_figure([lora_model], 10, [0.1, 0.5], 0.5)
    assert colors.dark_patch(sweep) == {"layout": {}, "data": {}}


def test_breakdown_legend_only_holds_fine_tunes_that_draw(lora_model: ModelResult, full_model: ModelResult) -> None:
    """A fine-tune with no intruder drew no bar but sat in the legend; it is named under the title."""
    fig = comparison.breakdown_figure([lora_model, full_model], 10, 0.5, "layer")
    assert [t.name for t in fig.data] == ["LoRA run (LoRA r=4)"] and fig.layout.showlegend is True
    assert "no intruders: Full FT" in fig.layout.title.text
    assert fig.layout.yaxis.range[0] == 0
    none = comparison.breakdown_figure([full_model], 10, 0.5, "module")
    assert all(t.showlegend is False for t in none.data) and "no intruders: Full FT" in none.layout.title.text


def test_linear_facets_share_one_range_from_zero(lora_model: ModelResult, full_model: ModelResult) -> None:
    """With log off, each row of facets had its own y range."""
    six = [
        replace(m, id=replace(m.id, name=f"{mod}.{m.layer}", module=mod))
        for m in full_model.matrices
        for mod in ("query", "key", "value", "attn_out", "mlp_in", "mlp_out")
    ]
    model = ModelResult(**{**full_model.__dict__, "matrices": six})
    fig = comparison.effective_rank_figure([model, lora_model], log_y=False)
    ranges = {tuple(fig.layout[name].range) for name in fig.layout if name.startswith("yaxis")}
    assert len(ranges) == 1
    (low, high), values = ranges.pop(), [y for t in fig.data for y in t.y]
    assert low == 0 and max(values) <= high <= 1.1 * max(values)


def test_similarity_rank_axes_are_one_based(lora_model: ModelResult) -> None:
    fig = spectra.similarity_figure(lora_model.matrices[0], 10, 0.5)
    assert fig.layout.xaxis.range[0] == 0.5 and fig.layout.xaxis.tickvals[0] == 1
    assert fig.layout.yaxis.range[1] == 0.5 and fig.layout.yaxis.tickvals[0] == 1
    assert all(t >= 1 for t in fig.layout.xaxis.tickvals)
    marks = next(t for t in fig.data if t.name == "intruder")
    assert set(marks.x) == {0.5} and marks.cliponaxis is False  # on the heatmap's edge, not off the axis


def test_spectrum_leaves_room_over_the_top_intruder_for_its_label(lora_model: ModelResult) -> None:
    """The "#1"/"#2" labels sit over the crosses: the y range reaches 0.15 of its span (30 of
    the plot's 200 px or more) above the highest intruder, where a 5 % pad cut them (Chromium's
    check: tests/test_figures_browser.py)."""
    matrix = next(m for m in lora_model.matrices if m.layer == 0 and m.module == "query")
    fig = spectra.spectrum_figure(matrix, 10, 0.5)
    marks = next(t for t in fig.data if t.name.startswith("intruder"))
    assert list(marks.text) == ["#1", "#2"]
    low, high = fig.layout.yaxis.range
    assert high - np.log10(max(marks.y)) >= 0.15 * (high - low) - 1e-9


def test_spectrum_labels_of_crowded_intruders_do_not_share_a_row(lora_model: ModelResult) -> None:
    """Eight intruders at ranks 1-8: ranks 3-8 lie within 60 px of a phone's log axis, where
    eight labels over the crosses ran into one another ("#3#4#5#6#7#8"). Labels take turns
    above and below; one with no room in either row is left to its hover."""
    matrix = next(m for m in lora_model.matrices if m.layer == 0 and m.module == "query")
    scores = np.array(matrix.intruder_scores, dtype=float)
    scores[:8] = 0.1
    fig = spectra.spectrum_figure(replace(matrix, intruder_scores=scores), 10, 0.5)
    marks = next(t for t in fig.data if t.name.startswith("intruder"))
    assert list(marks.x) == list(range(1, 9))
    shown = [(np.log10(x), row) for x, text, row in zip(marks.x, marks.text, marks.textposition, strict=True) if text]
    assert len(shown) >= 6 and {row for _, row in shown} == {"top right", "bottom right"}
    for row in ("top right", "bottom right"):
        at = [x for x, r in shown if r == row]
        assert all(b - a >= 0.15 for a, b in zip(at, at[1:], strict=False)), (row, at)
    assert all(text in ("", f"#{x}") for x, text in zip(marks.x, marks.text, strict=True))
    assert "#1" in marks.text and "#2" in marks.text


def test_titles_fit_a_phone(lora_model: ModelResult) -> None:
    """No title line longer than a phone holds (the tensor name was cut: "...self.query.w")."""
    long = "model.encoder.block.11.layer.1.EncDecAttention.self_attention.query_key_value.weight"
    matrix = replace(lora_model.matrices[0], id=replace(lora_model.matrices[0].id, name=long))
    for fig in (
        spectra.similarity_figure(matrix, 10, 0.5, label="LoRA run"),
        spectra.spectrum_figure(matrix, 10, 0.5, label="LoRA run"),
        mitigation.spectra_figure(matrix, matrix, [0], label="LoRA run"),
    ):
        lines = [line.replace("<sup>", "").replace("</sup>", "") for line in fig.layout.title.text.split("<br>")]
        assert all(len(line) <= style.PHONE_LINE_CHARS for line in lines[1:]), lines
        assert long in "".join(lines)
        assert fig.layout.margin.t >= 50 + 16 * (len(lines) - 1)
    assert style.wrap_name("a" * 100).replace("<br>", "") == "a" * 100


def test_series_panels_start_at_zero(lora_model: ModelResult) -> None:
    """Series panels started at 10 or 220: a rise of 2 % drawn as one across the panel."""
    models = [replace(lora_model, source=f"s{s}", step=s) for s in (10, 20, 30)]
    fig = series.series_trend_figure(series_tables.series_table(models, 10, 0.5))
    axes = [fig.layout[name] for name in fig.layout if name.startswith("yaxis")]
    assert len(axes) == 4 and all(a.rangemode == "tozero" for a in axes)
    assert float(fig.layout.yaxis.dtick).is_integer() and fig.layout.yaxis.tickformat == "d"  # intruders: counts


def test_series_rl_panels_are_labelled_on_a_phone(lora_model: ModelResult) -> None:
    """The series page's RL chart: the right column had no step ticks when the last row held one
    panel, titles overlapped at 390 px ("Principal-mask ove[Num]erical rank of ΔW / mi"), the
    axes ran from -1 to 1 for an all-zero measure, "200µ" for a ratio, and the title said "(model)"."""
    models = [replace(lora_model, source=f"s{s}", step=s) for s in (10, 20, 30)]
    table = series_tables.series_table(models, 10, 0.5)
    fig = rl_measures.series_rl_figure(table, "model", "LoRA run")
    titles = [a.text for a in fig.layout.annotations]
    assert len(titles) >= 3 and all(len(t) <= style.PHONE_LINE_CHARS // 2 for t in titles), titles
    assert "(whole model)" in fig.layout.title.text and "LoRA run" in fig.layout.title.text
    drawn = {t.xaxis.replace("x", "xaxis") for t in fig.data}  # an empty cell's axis is not drawn
    labelled = [fig.layout[name] for name in drawn if fig.layout[name].showticklabels is not False]
    assert len(labelled) == 2 and all(a.title.text == "training step" for a in labelled)  # one per column
    domains = {tuple(a.domain) for a in labelled}
    assert len(domains) == 2  # the two columns
    yaxes = [fig.layout[name] for name in {t.yaxis.replace("y", "yaxis") for t in fig.data}]
    assert len(yaxes) == len(titles) and all(a.rangemode == "tozero" and a.tickformat == ".3~g" for a in yaxes)
    steps = {tuple(t.x) for t in fig.data}
    assert steps == {(10, 20, 30)}


def test_mitigation_words_and_window() -> None:
    assert mitigation.change_text(0.0) is None and mitigation.change_text(0.0004) is None  # not "up +0.0 %"
    assert mitigation.change_text(-0.1234) == "-12.3 %" and mitigation.change_text(0.002) == "+0.2 %"
    # The re-factorisation error card has its table column's digits (it wrote "%.3g": "0.123 %").
    totals = {"refactor_error": 0.0012345, "delta_fro_exact": 1.0}
    assert mitigation.refactor_text(totals) == "0.12 %" == MEASURES["percent"].text(0.12345)
    assert mitigation.refactor_text({"refactor_error": 0.0, "delta_fro_exact": 0.0}) == "0.00 %"
    # The spectra open on the top ranks around the scaled components.
    assert mitigation.spectra_window(384, [0, 3]) == mitigation.SPECTRA_WINDOW
    assert mitigation.spectra_window(384, [40]) == 82 and mitigation.spectra_window(10, [2]) == 10


def test_mitigation_spectra_open_around_the_scaled_components(lora_model: ModelResult) -> None:
    matrix = lora_model.matrices[0]
    fig = mitigation.spectra_figure(matrix, matrix, [0, 1])
    assert list(fig.layout.xaxis.range) == [0.5, 24.5]
    shown = [y for t in fig.data for x, y in zip(t.x, t.y, strict=True) if x <= 24]
    low, high = fig.layout.yaxis.range
    assert low == 0 and max(shown) <= high <= 1.1 * max(shown)  # linear from 0: a scaled σ shows its drop
    assert "ranks 1–24 of 40" in fig.layout.title.text
    assert "all 40 ranks" in mitigation.spectra_figure(matrix, matrix, []).layout.title.text


def test_why_scaled_intruders_stay_intruders_is_said_with_the_numbers() -> None:
    counts = {"before": [30], "after": [21]}
    result = SimpleNamespace(
        mitigation=SimpleNamespace(settings=SimpleNamespace(lam=0.75), totals=lambda: {"intruders_scaled": 30}),
        counts=lambda eps, k: counts,
    )
    text = mitigation.why_intruders_stay(result, 10, 0.5)
    assert "λ = 0.75" in text and "keeps its direction" in text and "top 10" in text and "30" in text and "21" in text


@pytest.mark.parametrize(
    ("losses", "tasks"),
    [([2.14, 2.075, 2.09, 2.1], [0.40, 0.57, 0.55, 0.5]), ([1.0, 1.0, 1.0], [0.5, 0.5, 0.5])],
)
def test_tradeoff_axes_do_not_exaggerate(losses: list[float], tasks: list[float]) -> None:
    """The loss axis spanned 2.075-2.14 (3 % of the loss): base and fine-tune at opposite edges."""
    points = [{"label": "base", "lam": None, "loss": losses[0], "task": tasks[0]}]
    points.append({"label": "fine-tune", "lam": 1.0, "loss": losses[1], "task": tasks[1]})
    points += [
        {"label": "λ", "lam": lam, "loss": x, "task": y}
        for lam, x, y in zip((0.0, 0.5), losses[2:], tasks[2:], strict=False)
    ]
    tradeoff = SimpleNamespace(points=points, task_name="MRR", loss_name="held-out loss", note="")
    fig = mitigation.tradeoff_figure(SimpleNamespace(tradeoff=tradeoff))
    for axis, values in ((fig.layout.xaxis, losses), (fig.layout.yaxis, tasks)):
        low, high = axis.range
        assert low <= min(values) and max(values) <= high
        assert high - low >= mitigation.MIN_RELATIVE_SPAN * max(map(abs, values))


def test_a_narrow_log_range_still_gets_labelled_ticks() -> None:
    """Amplification factors of 1.05 to 1.2 on a log axis got no tick label at all (the only
    1-2-5 value near them, 1, lay outside the range)."""
    for low, high in ((1.05, 1.2), (0.0123, 0.0131), (250.0, 320.0), (2.9, 3.1)):
        values, text = style.log_ticks(low, high)
        assert len(values) >= 2 and all(low <= v <= high for v in values), (low, high, values)
        assert len(set(text)) == len(text)  # each label says a different number
    assert style.log_ticks(3.0, 3.0) == ([3.0], ["3"])


def test_chance_label_is_clear_of_the_curves_at_zero(lora_model: ModelResult, full_model: ModelResult) -> None:
    # The "chance" label sat at the bottom of the band, under the markers of every fine-tune
    # with no intruders at small ε (all of them: counts grow with ε), and could not be read;
    # the ε line's label holds the top.
    models = [full_model, lora_model]
    fig = rl_measures.add_chance_band(comparison.sweep_figure(models, 10, [0.1, 0.5, 0.9], eps=0.5), models)
    labels = {a.text: a for a in fig.layout.annotations}
    chance, eps = labels["chance"], labels["ε = 0.5"]
    assert chance.yref == "y domain" and chance.y == pytest.approx(0.5) and chance.yanchor == "middle"
    assert eps.y == pytest.approx(1) and eps.yanchor == "top"
