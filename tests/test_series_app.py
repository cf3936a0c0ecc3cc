"""The checkpoint-series page and series on the other pages, in Streamlit's AppTest.

Series are real tiny checkpoints (tests/test_series.py builds them); numbers on screen are
checked against the engine run directly on the same folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from analysis.compare import compare
from charts.rl_tables import group_value
from tests.app_fixtures import shown
from tests.test_app import APP, figures, wait_for_jobs
from tests.test_series import make_full_series


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("WSE_ALLOW_LOCAL_PATHS", raising=False)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def run_dir(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_full_series(tiny_bert, tmp_path_factory.mktemp("app-series") / "full-run")


def _open(base: Path, tuned: list[str], page: str | None, **params: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["base"] = str(base)
    at.query_params["tuned"] = tuned
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    if page is not None:
        at.switch_page(page)
        at.run()
    wait_for_jobs()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_series_page_shows_every_checkpoint(cache_dir: Path, tiny_bert: Path, run_dir: Path) -> None:
    spec = f"series:{run_dir}"
    at = _open(tiny_bert, [spec], "pages/series.py")
    assert [t.value for t in at.title] == ["Checkpoint series"]
    assert "3 of 3 checkpoints analysed" in " ".join(c.value for c in at.caption)
    trend, rl, grid, similarity = figures(at)
    assert {tuple(t.x) for t in trend.data} == {(5, 10, 20)}
    # One step control, the page's, offers every step; both step-by-step charts show the last.
    assert list(at.select_slider(key="w_step").options) == ["5", "10", "20"]
    assert all("at step 20" in f.layout.title.text and not f.frames for f in (grid, similarity))
    assert {tuple(t.x) for t in rl.data} == {(5, 10, 20)}  # the RL-versus-SFT measures by step (issue 23)
    engine = compare(str(tiny_bert), [str(run_dir)], cache=None).models
    intruders = next(t for t in trend.data if t.yaxis == "y")  # the first panel: intruders
    assert list(intruders.y) == [m.total_intruders(10, 0.5) for m in engine]
    table = at.dataframe[0].value
    assert table["step"].tolist() == [5, 10, 20]
    # Each row is a group: a header says how it aggregates, a sparsity is in % (the CSV keeps the share).
    words = {column: config.get("label") for column, config in json.loads(at.dataframe[0].proto.columns).items()}
    assert words["effective_rank"] == "mean effective rank of ΔW" and words["rank90"] == "mean rank90 of ΔW"
    assert words["update_sparsity"] == "update sparsity, Zhu Eq. 1 (%)"
    pooled = [group_value(m.matrices, "update_sparsity", 10, 0.5) for m in engine]
    assert table["update_sparsity"].tolist() == pytest.approx([100 * v for v in pooled])
    assert table["delta_fro"].tolist() == pytest.approx(
        [sum(x.delta_fro**2 for x in m.matrices) ** 0.5 for m in engine], rel=1e-6
    )
    assert at.query_params["series"] in (spec, [spec])
    best = at.dataframe[2].value  # one matrix across steps: its top-k best matches per step
    assert best["step"].unique().tolist() == [5, 10, 20] and len(best) == 3 * 10
    first = next(m for m in engine[0].matrices if m.name == at.query_params["matrix"])
    assert best["best_match_score"].tolist()[:10] == pytest.approx(first.intruder_scores[:10].tolist(), abs=1e-6)
    # per-layer lines: one per layer and step
    at.radio(key="w_lines").set_value("layer").run()
    assert not at.exception
    assert sorted(at.dataframe[0].value["group"].unique()) == ["L0", "L1"]
    at.radio(key="w_grid").set_value("rank90").run()
    second = next(m for m in engine[0].matrices if m.layer == 1 and m.module == "value")
    at.selectbox(key="w_matrix").set_value(second.name).run()
    assert at.select_slider(key="w_step").value == 20  # the last step unless the link names one
    at.select_slider(key="w_step").set_value(10).run()
    assert not at.exception
    assert (at.query_params["lines"], at.query_params["grid"], at.query_params["matrix"], at.query_params["step"]) == (
        "layer",
        "rank90",
        second.name,
        "10",
    )
    # A fresh visitor opening the same link sees the same controls and the same numbers.
    params = {key: at.query_params[key] for key in ("series", "lines", "grid", "matrix", "step")}
    again = _open(tiny_bert, [spec], "pages/series.py", **params)
    assert again.radio(key="w_lines").value == "layer" and again.radio(key="w_grid").value == "rank90"
    assert again.selectbox(key="w_matrix").value == second.name and again.select_slider(key="w_step").value == 10
    _, _rl, grid, similarity = figures(again)
    for fig in (grid, similarity):  # both step-by-step charts show step 10: one step control, the page's
        assert "at step 10" in fig.layout.title.text and not fig.frames and not fig.layout.sliders
    assert sorted(again.dataframe[0].value["group"].unique()) == ["L0", "L1"]
    assert again.dataframe[1].value.columns[-1] == "rank90"
    assert again.dataframe[2].value["best_match_score"].tolist()[:10] == pytest.approx(
        second.intruder_scores[:10].tolist(), abs=1e-6
    )


def test_final_checkpoint_appears_on_the_other_pages(cache_dir: Path, tiny_bert: Path, run_dir: Path) -> None:
    spec = f"series:{run_dir}"
    at = _open(tiny_bert, [spec], None)
    assert [t.value for t in at.title] == ["Overview"]
    table = at.dataframe[0].value
    assert table["model"].tolist() == ["full-run · step 20"]
    final = compare(str(tiny_bert), [str(run_dir / "checkpoint-20")], cache=None).models[0]
    assert table["intruders"].tolist() == [final.total_intruders(10, 0.5)]


def test_models_page_adds_a_series(cache_dir: Path, tiny_bert: Path, run_dir: Path, tmp_path: Path) -> None:
    at = _open(tiny_bert, [], "pages/models.py")
    at.text_input(key="add_series").set_value(str(run_dir)).run()
    at.button(key="add_series_button").click().run()
    assert not at.exception
    assert at.query_params["tuned"] in (f"series:{run_dir}", [f"series:{run_dir}"])
    labels = [shown(e.label) for e in at.expander]
    assert any("full-run (series of 3), steps 5, 10, 20" in label for label in labels), labels
    # a folder that is not a series is refused with the reason
    at.text_input(key="add_series").set_value(str(tiny_bert)).run()
    at.button(key="add_series_button").click().run()
    assert any("single model" in e.value for e in at.error)
    # the plain "add a fine-tune" box recognises a training output folder as a series too
    at.multiselect(key="w_tuned").set_value([]).run()
    at.text_input(key="add_spec").set_value(str(run_dir)).run()
    at.button(key="add_spec_button").click().run()
    assert at.query_params["tuned"] in (f"series:{run_dir}", [f"series:{run_dir}"])


def test_uploads_become_a_series(cache_dir: Path, tiny_bert: Path, tmp_path: Path) -> None:
    """Two uploaded PEFT checkpoints made one series, in the order they were added."""
    from tests.test_app import _adapter_zip
    from tests.test_series import make_lora_series

    run = make_lora_series(tiny_bert, tmp_path / "lora-run")
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["base"] = str(tiny_bert)
    at.switch_page("pages/models.py").run()
    for step in (2, 4):
        at.file_uploader[0].set_value(
            [(f"ckpt{step}.zip", _adapter_zip(run / f"checkpoint-{step}"), "application/zip")]
        )
        at.run()
        at.button(key="add_upload").click().run()
    assert not at.exception
    uploads = at.query_params["tuned"]
    assert len(uploads) == 2 and all(u.startswith("upload:") for u in uploads)
    at.button(key="uploads_as_series").click().run()
    spec = "series:" + ",".join(uploads)
    assert at.query_params["tuned"] == spec and at.query_params["series"] == spec
    at.switch_page("pages/series.py").run()
    wait_for_jobs()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "2 of 2 checkpoints analysed · steps 2, 4" in " ".join(shown(c.value) for c in at.caption)
    # the steps come from each upload's trainer_state.json, the label from what they are
    assert any("uploaded checkpoints (series of 2)" in shown(c.value) for c in at.caption)
    trend = figures(at)[0]
    engine = compare(str(tiny_bert), [str(run)], cache=None).models
    delta = next(t for t in trend.data if t.yaxis == "y4")  # the last panel: ||dW||
    assert list(delta.y) == pytest.approx([sum(x.delta_fro**2 for x in m.matrices) ** 0.5 for m in engine], rel=1e-6)


def test_a_bad_series_is_reported_on_every_page(cache_dir: Path, tiny_bert: Path, tmp_path: Path) -> None:
    missing = f"series:{tmp_path / 'nowhere'}"
    at = _open(tiny_bert, [missing], None)
    assert any("could not be analysed" in e.value and "no such folder" in e.value for e in at.error)
    at.switch_page("pages/series.py").run()
    assert not at.exception
    assert any("no such folder" in e.value for e in at.error)


def test_series_page_offers_the_demos_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen in the browser: on the demo, the page only said "add a series first", although
    the demo saved checkpoints while it trained. It offers them: one click adds the series
    (base kept) and draws it."""
    import shutil

    from tests.app_fixtures import make_standin_demo

    cache = tmp_path / "cache"
    manifest = make_standin_demo(cache / "demo")
    r1 = next(m for m in manifest.fine_tunes if m.name == "lora-r1")
    for step in (1, 2):  # the builder's layout: <root>/checkpoints/<name>/checkpoint-N
        shutil.copytree(r1.path, cache / "demo" / "checkpoints" / "lora-r1" / f"checkpoint-{step}")
    monkeypatch.setenv("WSE_CACHE_DIR", str(cache))
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.switch_page("pages/series.py").run()
    assert not at.exception
    buttons = {shown(b.label): b for b in at.button}
    assert list(buttons) == ["LoRA r=1 (stand-in) (series of 2)"]  # only fine-tunes with checkpoints
    buttons["LoRA r=1 (stand-in) (series of 2)"].click().run()
    wait_for_jobs()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.query_params["base"] == "demo:base"
    assert at.query_params["series"] in ("series:demo:lora-r1", ["series:demo:lora-r1"])
    assert "series:demo:lora-r1" in at.query_params["tuned"]
    assert "2 of 2 checkpoints analysed" in " ".join(c.value for c in at.caption)
    trend, _rl, _grid, _similarity = figures(at)
    assert {tuple(t.x) for t in trend.data} == {(1, 2)}
