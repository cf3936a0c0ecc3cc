"""The RL vs SFT page (issue 23) in Streamlit's AppTest, on tiny real models, against the engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from charts import rl_measures, rl_tables
from charts.table_words import table_format
from charts.tables import identity_order
from tests.test_app import figures, open_app, wait_for_jobs


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("WSE_ALLOW_LOCAL_PATHS", raising=False)
    return tmp_path / "cache"


def test_rl_page_shows_the_engines_measures(cache_dir: Path, tiny_bert: Path, tiny_bert_full_ft: Path) -> None:
    from analysis.compare import compare

    engine = compare(str(tiny_bert), [str(tiny_bert_full_ft)], cache=None).models[0]
    at = open_app(tiny_bert, [tiny_bert_full_ft])
    at.switch_page("pages/rl_measures.py").run()
    wait_for_jobs()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert [t.value for t in at.title] == ["RL vs SFT measures"]
    table = at.dataframe[0].value
    # The whole-model figure, as the command line's report has it (computed in the worker job): every
    # comparable parameter, the 1-D ones included, not only the analysed matrices'.
    whole = engine.summary["whole_model_sparsity"]
    assert whole["other_tensors"] > 0 and whole["parameters"] > sum(m.rl.counts.total for m in engine.matrices)
    assert table["sparsity_pct"].iloc[0] == pytest.approx(100 * whole["sparsity_relative"], rel=1e-12)
    assert table["sparsity_abs_pct"].iloc[0] == pytest.approx(100 * whole["sparsity_absolute"], rel=1e-12)
    assert table["counts"].iloc[0] == f"{whole['parameters']:,} parameters: every comparable one, 1-D included"
    # On screen each measure with its one number of decimals (charts.table_words.MEASURES), not
    # Streamlit's default (the CSV above keeps the whole number; tests/test_table_digits.py).
    config = json.loads(at.dataframe[0].proto.columns)
    for column in ("sparsity_pct", "max_principal_angle_deg", "median_update_rank_fraction"):
        assert config[column]["type_config"]["format"] == table_format(column) is not None, column
    said = " ".join(c.value for c in at.caption)
    assert whole["counts"] in said  # which parameters, in the report's words
    figs = figures(at)
    grid = next(f for f in figs if f.data and f.data[0].type == "heatmap")
    values = np.asarray(grid.data[0].z, dtype=float)
    # In % as the table above gives it (QA 2026-12-07: the grid said 0.20 under a table saying 54.63).
    assert np.nanmax(values) == pytest.approx(100 * max(m.rl.sparsity() for m in engine.matrices))
    assert grid.layout.coloraxis.colorbar.title.text == "Sparsity, Zhu Eq. 1 (%)"
    rotation = next(f for f in figs if "rotation" in (f.layout.title.text or ""))
    first = identity_order(engine.matrices)[0]  # the matrix picker's first choice
    shown = np.asarray(rotation.data[0].customdata, dtype=float)
    np.testing.assert_allclose(shown, first.rl.angles_left, rtol=1e-9)


def test_chance_band_is_drawn_on_intruders_vs_eps(tiny_bert: Path, tiny_bert_full_ft: Path) -> None:
    from analysis.compare import compare
    from charts import comparison

    models = compare(str(tiny_bert), [str(tiny_bert_full_ft)], cache=None).models
    fig = rl_measures.add_chance_band(comparison.sweep_figure(models, 10, [0.1, 0.5, 0.9]), models)
    band = [s for s in fig.layout.shapes if s.type == "rect"]
    chance = rl_tables.chance_table(models)
    assert len(band) == 1 and band[0].x0 == pytest.approx(chance["p5"].min())
    assert band[0].x1 == pytest.approx(chance["p95"].max())
