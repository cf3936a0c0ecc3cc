"""One measure, one number of decimals, in every row of every table (QA pass of 2026-12-07, tables).

The pass found every table column without a format of its own written in Streamlit's default
(up to four decimals, trailing zeros dropped): the overview's mean effective rank 222.374
beside 6.6505 and 1, the similarity page's best |cos| 0.9998 beside 1, the series trends'
6.647 beside 6.6505, the amplification factor 0.025 beside 0.0081, the principal angles 0.108
beside 0.1173. The Mitigate page's table rounded its numbers in the frame itself (‖ΔW‖ change
-23.1 beside -8.71; 4.951 beside 20.4343), so its CSV lost digits as the RL table's sparsity
(two decimals) did. Now each measure's digits are :data:`charts.table_words.MEASURES`', every
table's float column of a measure is written with them (:func:`ui.views.column_config`), and
the CSVs hold the numbers as computed.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.results import ModelResult
from charts import matrix_tables, mitigation, rl_tables, series_tables, tables
from charts.table_words import GROUP_COLUMN_WORDS, MEASURES, column_measure, table_format
from tests.test_figures import full_model, lora_model  # noqa: F401 (fixtures)
from ui.views import column_config, display_table


def shown(config: dict, column: str, values) -> list[str]:
    """The cells' text as the browser writes it.

    With a format, Streamlit's printf (sprintf-js): ``%.Nf`` is JavaScript's ``toFixed(N)``,
    ``%.Ne`` its ``toExponential(N)`` (``1.01e-4``). Without one, Streamlit's default: up to
    four decimals, trailing zeros dropped (what the QA pass saw: ``222.374``, ``1``, ``6.6505``).
    """
    fmt = fmt_of(config, column)
    out = []
    for v in values:
        if not np.isfinite(v):
            out.append("—")  # Streamlit's placeholder
        elif fmt is None:
            out.append(f"{v:.4f}".rstrip("0").rstrip("."))
        elif fmt.endswith("f"):
            out.append(fmt % v)
        else:
            mantissa, exponent = (fmt % v).split("e")
            out.append(f"{mantissa}e{int(exponent):+d}")
    return out


def fmt_of(config: dict, column: str) -> str | None:
    """The printf format the column is written with (``None``: Streamlit's default)."""
    return ((config.get(column) or {}).get("type_config") or {}).get("format")


def decimals(text: str) -> int:
    mantissa = text.split("e")[0]
    return len(mantissa.split(".")[1]) if "." in mantissa else 0


def screen(frame: pd.DataFrame, words=None) -> tuple[pd.DataFrame, dict]:
    display = display_table(frame)
    return display, column_config(display, words)


def test_a_known_frame_is_written_with_its_measures_digits() -> None:
    """The overview's totals, the similarity page's table and the series trends, as the QA pass saw them."""
    totals = pd.DataFrame(
        {
            "model": ["Full fine-tuning", "LoRA r=1", "LoRA r=8"],
            "matrices": [36, 36, 36],
            "intruders": [0, 30, 3],
            "mean_effective_rank": [222.37395424035287, 1.0, 6.6505],
            "mean_rank90": [87.30555555555556, 1.0, 4.7222],
        }
    )
    _, config = screen(totals)
    assert shown(config, "mean_effective_rank", totals["mean_effective_rank"]) == ["222.4", "1.0", "6.7"]
    assert shown(config, "mean_rank90", totals["mean_rank90"]) == ["87.3", "1.0", "4.7"]
    assert fmt_of(config, "intruders") is None and fmt_of(config, "matrices") is None  # whole numbers
    intruders = pd.DataFrame(
        {
            "tuned_rank": [1, 2, 3],
            "singular_value": [6.1252, 4.739, 4.69111],
            "best_match_score": [0.99981, 1.0, 0.99993],
            "best_match_base_rank": [1, 2, 3],
            "intruder": [False, False, False],
        }
    )
    _, config = screen(intruders)
    assert shown(config, "best_match_score", intruders["best_match_score"]) == ["0.9998", "1.0000", "0.9999"]
    assert shown(config, "singular_value", intruders["singular_value"]) == ["6.1252", "4.7390", "4.6911"]
    assert fmt_of(config, "best_match_base_rank") is None and fmt_of(config, "tuned_rank") is None
    trend = pd.DataFrame({"step": [10, 20], "effective_rank": [6.647, 6.6505], "update_sparsity": [0.2, 0.5463125]})
    display, config = screen(trend, GROUP_COLUMN_WORDS)
    assert shown(config, "effective_rank", display["effective_rank"]) == ["6.6", "6.7"]
    assert shown(config, "update_sparsity", display["update_sparsity"]) == ["20.00", "54.63"]  # in %
    assert list(trend["update_sparsity"]) == [0.2, 0.5463125]  # the CSV's frame keeps the share


def test_no_measure_has_a_format_that_drops_trailing_zeros() -> None:
    """``g`` writes 0.5 beside 0.4873 in the browser (sprintf-js: ``Number(x.toPrecision(n))``)."""
    for key, measure in MEASURES.items():
        assert re.fullmatch(r"\.\d+[fe]", measure.digits), (key, measure.digits)


def test_one_measure_has_one_format_on_every_page() -> None:
    """The same measure under its columns' names on different pages: one format."""
    same = [
        ("effective_rank", "mean_effective_rank"),
        ("rank90", "mean_rank90"),
        ("update_sparsity", "sparsity_pct"),
        ("update_sparsity_absolute", "sparsity_abs_pct"),
        ("spectral_shift", "median_spectral_shift"),
        ("principal_angle_max", "max_principal_angle_deg", "left_deg", "right_deg"),
        ("mask_overlap", "mean_mask_overlap", "mask_alpha"),
        ("update_rank_fraction", "median_update_rank_fraction"),
        ("delta_fro", "‖ΔW‖ before", "‖ΔW‖ after"),
        ("best_match_score", "base_1", "base_100", "median", "p5", "p95"),
        ("singular_value", "base", "tuned", "update"),
        ("epsilon", "eps"),
    ]
    for columns in same:
        formats = {table_format(c) for c in columns}
        assert len(formats) == 1 and None not in formats, (columns, formats)
    assert table_format("j_3") == f"%{MEASURES['phi'].digits}"
    assert table_format("model") is None and table_format("matrices") is None


def _every_table(models: list[ModelResult]) -> list[tuple[str, pd.DataFrame, dict | None]]:
    lora = models[0]
    a, b = lora.matrices[0], replace(lora.matrices[0])
    series = [replace(lora, source=f"s{step}", step=step) for step in (10, 20)]
    out = [
        ("matrices", tables.matrix_table(models, 10, 0.5), None),
        ("totals", tables.totals_table(models, 10, 0.5), None),
        ("sweep", tables.sweep_table(models, 10, [0.1, 0.15, 0.5]), None),
        ("amplification", tables.amplification_table(models), None),
        ("spectrum", matrix_tables.spectrum_table(a), None),
        ("intruders", matrix_tables.intruder_table(a, 10, 0.5), None),
        ("similarity", matrix_tables.similarity_table(a), None),
        ("phi", matrix_tables.phi_table(matrix_tables.subspace_similarity(a, b)), None),
        ("rl", rl_tables.sparsity_table(models, "base", 10, 0.5), None),
        ("angles", rl_tables.angles_table(a), None),
        ("series-trends", series_tables.series_table(series, 10, 0.5), GROUP_COLUMN_WORDS),
        ("series-similarity", series_tables.series_similarity_table(series, a.key, 10, 0.5), None),
    ]
    out += [
        (f"series-grid-{m}", series_tables.series_grid_table(series, m, 10, 0.5), None)
        for m in series_tables.SERIES_METRICS
    ]
    return out


def test_every_tables_numbers_have_one_number_of_decimals_per_column(
    lora_model: ModelResult,  # noqa: F811
    full_model: ModelResult,  # noqa: F811
) -> None:
    """Every table the pages show: a float column of a measure has its measure's format, so
    its cells have one number of decimals; any other float column holds whole numbers only
    (an intruder count with a gap), which Streamlit writes without decimals."""
    seen = set()
    for name, frame, words in _every_table([lora_model, full_model]):
        display, config = screen(frame, words)
        for column in display.columns:
            if not pd.api.types.is_float_dtype(display[column]):
                continue
            values = display[column].to_numpy(dtype=float)
            measure = column_measure(column)
            if measure is None:
                finite = values[np.isfinite(values)]
                assert np.array_equal(finite, np.round(finite)), (name, column)
                continue
            assert fmt_of(config, column) == f"%{measure.digits}", (name, column)
            texts = [t for t in shown(config, column, values) if t != "—"]
            assert len({decimals(t) for t in texts}) <= 1, (name, column, texts[:8])
            seen.add(column)
    # The tables above hold every kind of measure column the pages show.
    assert {"effective_rank", "mean_effective_rank", "delta_fro", "best_match_score", "base_1", "j_1"} <= seen
    assert {"base", "singular_value", "amplification_factor", "stable_rank", "epsilon"} <= seen


@pytest.fixture(scope="module")
def rl_model(tiny_bert: Path, tiny_bert_full_ft: Path) -> ModelResult:
    from analysis.compare import compare

    (model,) = compare(str(tiny_bert), [str(tiny_bert_full_ft)], cache=None).models
    return model


def test_rl_tables_numbers_have_their_digits_and_the_csv_keeps_them_whole(rl_model: ModelResult) -> None:
    """The RL page's table: angles and shares with their measures' digits; the CSV's sparsity as computed
    (it was rounded to two decimals in the frame)."""
    frame = rl_tables.sparsity_table([rl_model], "base", 10, 0.5)
    whole = rl_model.summary["whole_model_sparsity"]
    assert frame["sparsity_pct"].iloc[0] == 100.0 * whole["sparsity_relative"]
    assert frame["sparsity_abs_pct"].iloc[0] == 100.0 * whole["sparsity_absolute"]
    display, config = screen(frame)
    for column in ("sparsity_pct", "max_principal_angle_deg", "mean_mask_overlap", "median_spectral_shift"):
        assert fmt_of(config, column) == table_format(column) is not None, column
    angles = rl_tables.angles_table(rl_model.matrices[0])
    _, config = screen(angles)
    texts = shown(config, "left_deg", angles["left_deg"])
    assert len({decimals(t) for t in texts if t != "—"}) == 1, texts


def test_mitigation_table_keeps_its_numbers_whole_for_the_csv(tiny_bert: Path, model_root: Path) -> None:
    """The Mitigate page's per-matrix table: ‖ΔW‖ and the changes as computed (the CSV), written with
    their measures' digits on screen (they were rounded to 6, 2 and 4 decimals in the frame)."""
    from analysis.mitigation import MitigationSettings, run
    from analysis.specs import SpecResolver
    from tests import factories

    adapter = factories.make_lora_adapter(tiny_bert, model_root / "digits-lora", "mlp", r=4, factor_std=0.3)
    result = run(SpecResolver(allow_local_paths=True), str(tiny_bert), str(adapter), MitigationSettings(), cache=None)
    frame = mitigation.matrices_table(result, 10, 0.5)
    assert list(frame["‖ΔW‖ before"]) == [m.delta_fro_before for m in result.mitigation.matrices]
    assert list(frame["‖ΔW‖ after"]) == [m.delta_fro_after for m in result.mitigation.matrices]
    assert list(frame["‖ΔW‖ change %"]) == [100 * m.delta_change for m in result.mitigation.matrices]
    assert list(frame["re-factorisation error %"]) == [100 * m.refactor_rel_error for m in result.mitigation.matrices]
    display, config = screen(frame)
    for column in ("‖ΔW‖ before", "‖ΔW‖ after", "‖ΔW‖ change %", "re-factorisation error %"):
        texts = shown(config, column, display[column])
        assert fmt_of(config, column) == table_format(column) is not None, column
        assert len({decimals(t) for t in texts}) == 1, (column, texts)


def test_hovers_give_a_measure_with_its_tables_digits(lora_model: ModelResult) -> None:  # noqa: F811
    """The series' trend lines and the similarity heatmaps wrote ``.4g`` and ``.3f`` beside tables
    giving the same numbers with other digits; now a hover takes its measure's digits too."""
    from charts import rl_measures, series, spectra

    models = [replace(lora_model, source=f"s{step}", step=step) for step in (10, 20)]
    table = series_tables.series_table(models, 10, 0.5)
    trends = series.series_trend_figure(table, "model", "run")
    for trace, metric in zip(trends.data, series_tables.SERIES_METRICS, strict=False):
        assert f"%{{y:{MEASURES[metric].digits}}}" in trace.hovertemplate, (metric, trace.hovertemplate)
    lines = rl_measures.measure_lines(models[:1], "mask_overlap", 10, 0.5)
    assert f"%{{y:{MEASURES['mask_overlap'].digits}}}" in lines.data[0].hovertemplate
    similarity = spectra.similarity_figure(lora_model.matrices[0], 10, 0.5)
    cosine = MEASURES["cosine"].digits
    assert f"|cos| = %{{z:{cosine}}}" in similarity.data[0].hovertemplate
