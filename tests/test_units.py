"""One measure, one unit, wherever a user sees it; colour bars say what they show; group
columns say how they aggregate; series grids write their values (QA pass of 2026-12-07).

The QA pass found the RL vs SFT page's grids and lines giving update sparsity as a fraction
(0.20) under untitled colour bars while its table gave the same measure in % (54.63), the
series trend table calling a mean over a group's matrices "effective rank of ΔW", and the
series grid without the numbers the overview's grids write in their cells.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from analysis.results import ModelResult
from charts import overview, overview_tables, rl_measures, rl_tables, series, series_tables
from charts.table_words import COLUMN_WORDS, GROUP_COLUMN_WORDS, MEASURES
from tests.test_figures import _family, _tensor_name, lora_model  # noqa: F401 (fixture)
from ui.views import display_table


@pytest.fixture(scope="module")
def rl_models(tiny_bert: Path, tiny_bert_full_ft: Path) -> list[ModelResult]:
    """A real full fine-tune of a tiny BERT, with the RL-versus-SFT measures, at three steps."""
    from analysis.compare import compare

    (model,) = compare(str(tiny_bert), [str(tiny_bert_full_ft)], cache=None).models
    assert all(m.rl is not None for m in model.matrices)
    return [replace(model, source=f"s{step}", step=step) for step in (10, 20, 30)]


def _cell_text(fig):
    return next(t for t in fig.data if isinstance(t.meta, dict) and t.meta.get("role") == "cell-text")


def test_update_sparsity_is_in_percent_everywhere_it_is_shown(rl_models: list[ModelResult]) -> None:
    models = rl_models[:1]
    for metric in ("update_sparsity", "update_sparsity_absolute"):
        fractions = {m.key: rl_tables.rl_value(m, metric, 10, 0.5) for m in models[0].matrices}
        assert 0 < max(fractions.values()) <= 1  # the engine's number: a share
        # The grids (the overview's and the RL page's): colours, cell text and hover in %.
        (section,) = overview.overview_sections(models, metric, 10, 0.5)
        panel = section.panels[0]
        z = np.asarray(panel.data[0].z, dtype=float)
        assert np.nanmax(z) == pytest.approx(100 * max(fractions.values()))
        points = panel.data[-1]
        for key, hover in zip(points.customdata[:, 1], points.customdata[:, 4], strict=True):
            assert hover == f"{100 * fractions[key]:.2f} %"
        words = _cell_text(panel)  # the same cells, in the same order
        percents = [100 * fractions[key] for key in points.customdata[:, 1]]
        assert words.meta["values"] == pytest.approx(percents)
        assert list(words.text) == [overview.cell_label(v, metric) for v in percents]
        assert words.meta["high"] == panel.layout.coloraxis.cmax == pytest.approx(100 * max(fractions.values()))
        assert panel.layout.coloraxis.colorbar.title.text == MEASURES[metric].title()
        assert panel.layout.coloraxis.colorbar.title.text.endswith("(%)")
        # The lines by layer: the layer means in %, the axis says so.
        lines = rl_measures.measure_lines(models, metric, 10, 0.5)
        by_layer = {}
        for m in models[0].matrices:
            by_layer.setdefault(m.layer, []).append(fractions[m.key])
        assert list(lines.data[0].y) == pytest.approx([100 * np.mean(by_layer[layer]) for layer in sorted(by_layer)])
        assert lines.layout.yaxis.title.text.endswith("(%)") and " %<extra>" in lines.data[0].hovertemplate
    # The series' RL panels: the same unit.
    table = series_tables.series_table(rl_models, 10, 0.5)
    fig = rl_measures.series_rl_figure(table, "model", "run")
    titles = [a.text for a in fig.layout.annotations]
    panel = titles.index(MEASURES["update_sparsity"].title(kind=False))
    assert titles[panel].endswith("(%)")
    trace = next(t for t in fig.data if t.yaxis == ("y" if panel == 0 else f"y{panel + 1}"))
    assert list(trace.y) == pytest.approx(list(100 * table["update_sparsity"]))
    # The trend table: in % on screen, the CSV keeps the share, and its column says both.
    shown = display_table(table)
    assert list(shown["update_sparsity"]) == pytest.approx(list(100 * table["update_sparsity"]))
    assert table["update_sparsity"].max() <= 1  # the frame the CSV is written from is untouched
    for column in ("update_sparsity", "update_sparsity_absolute"):
        words, help_text = COLUMN_WORDS[column]
        assert words.endswith("(%)") and "CSV holds the share, 0-1" in help_text
    # The RL page's table has it in % too (the whole-model figure, Zhu et al. Table 1's shape).
    assert COLUMN_WORDS["sparsity_pct"][0].endswith("(%)")


def test_every_measure_has_one_unit_in_its_words() -> None:
    """Every colour-by choice and series measure has its one definition; a unit is in its column words."""
    assert set(overview_tables.OVERVIEW_METRICS) | set(series_tables.SERIES_METRICS) <= set(MEASURES)
    for metric, measure in MEASURES.items():
        assert measure.title()  # a colour bar's title
        for words in (COLUMN_WORDS, GROUP_COLUMN_WORDS):
            if measure.unit and metric in words:
                assert f"({measure.unit})" in words[metric][0], (metric, words[metric])
    assert MEASURES["principal_angle_max"].text(12.34) == "12.340°"
    assert MEASURES["update_sparsity"].text(0.2) == "20.00 %"
    assert (
        MEASURES["intruders"].title() == "Intruder dimensions (count)" and MEASURES["mask_overlap"].text(np.nan) == "–"
    )


def test_every_grid_colour_bar_says_its_measure_and_unit(lora_model: ModelResult) -> None:  # noqa: F811
    for metric in overview_tables.OVERVIEW_METRICS:
        for section in overview.overview_sections([lora_model], metric, 10, 0.5):
            for panel in section.panels:
                assert panel.layout.coloraxis.colorbar.title.text == MEASURES[metric].title(), metric
    models = [replace(lora_model, source=f"s{step}", step=step) for step in (10, 20)]
    for metric in series_tables.SERIES_METRICS:
        grid = series_tables.series_grid_table(models, metric, 10, 0.5)
        fig = series.series_grid_figure(grid, metric, "run")
        assert fig.layout.coloraxis.colorbar.title.text == MEASURES[metric].title() != metric


def test_group_columns_say_how_they_aggregate(lora_model: ModelResult) -> None:  # noqa: F811
    """The series trend table said "effective rank of ΔW" for the mean over a layer's matrices."""
    table = series_tables.series_table([replace(lora_model, step=10)], 10, 0.5, "layer")
    words = {**COLUMN_WORDS, **GROUP_COLUMN_WORDS}
    said = {column: " ".join(words[column]).lower() for column in table.columns if column in words}
    for column in ("effective_rank", "rank90", "spectral_shift", "update_rank_fraction"):
        assert words[column][0].startswith("mean "), words[column]  # the header itself says it
    assert "sum" in said["intruders"] and "together" in said["delta_fro"]
    for column in ("update_sparsity", "update_sparsity_absolute", "mask_overlap", "intruder_energy_share"):
        assert "together" in said[column], column  # pooled over the group, not a mean
    assert "largest" in said["principal_angle_max"]
    # A table of single matrices keeps the plain words (the overview's, the series grid's).
    assert not COLUMN_WORDS["effective_rank"][0].startswith("mean")


def test_series_grid_writes_its_values_in_the_cells(lora_model: ModelResult) -> None:  # noqa: F811
    models = [replace(lora_model, source=f"s{step}", step=step) for step in (10, 20)]
    for metric in ("intruders", "effective_rank"):
        grid = series_tables.series_grid_table(models, metric, 10, 0.5)
        fig = series.series_grid_figure(grid, metric, "run", step=10)
        heat = fig.data[0]
        words = _cell_text(fig)
        z = {(x, y): v for y, row in zip(heat.y, heat.z, strict=True) for x, v in zip(heat.x, row, strict=True)}
        written = dict(zip(zip(words.x, words.y, strict=True), words.text, strict=True))
        at10 = grid[grid["step"] == 10]
        assert len(written) == len(at10)  # one number per matrix, at its cell
        assert written == {cell: overview.cell_label(z[cell], metric) for cell in written}
        assert (words.xaxis, words.yaxis) == (heat.xaxis, heat.yaxis)
        assert (words.meta["low"], words.meta["high"]) == (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax)


def test_series_grid_leaves_cells_too_narrow_for_a_number_empty(lora_model: ModelResult) -> None:  # noqa: F811
    """As the overview: a grid of more columns than :data:`overview.OVERVIEW_TEXT_MAX_COLUMNS` (experts) has none."""
    proto = lora_model.matrices[0]
    experts = [(None, n, "down", e) for n in range(2) for e in range(overview.OVERVIEW_TEXT_MAX_COLUMNS + 4)]
    identities = [(None, n, m, None) for n in range(2) for m in ("query", "key")] + experts
    model = replace(_family(proto, identities, 1, _tensor_name), step=5)
    grid = series_tables.series_grid_table([model], "intruders", 10, 0.5)
    fig = series.series_grid_figure(grid, "intruders", "run")
    written = [t for t in fig.data if isinstance(t.meta, dict) and t.meta.get("role") == "cell-text"]
    assert [(t.xaxis, len(t.text)) for t in written] == [("x", 4)]  # the module grid only
