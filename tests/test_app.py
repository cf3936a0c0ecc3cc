"""Every dashboard page in Streamlit's AppTest, on tiny real models.

The app runs its analyses in background jobs; a test opens a page (which starts or joins
them), waits for the jobs, and runs the page again, as the page's own polling would.
Numbers on screen are checked against the engine run directly.
"""

from __future__ import annotations

import base64
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
from streamlit.testing.v1 import AppTest

from analysis.results import DEFAULT_EPSILONS
from tests.app_fixtures import shown

APP = str(Path(__file__).resolve().parent.parent / "app.py")
PAGES = {
    "similarity": "pages/similarity.py",
    "intruders": "pages/intruders.py",
    "effective_rank": "pages/effective_rank.py",
    "spectrum": "pages/spectrum.py",
    "subspace": "pages/subspace.py",
    "models": "pages/models.py",
}


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("WSE_ALLOW_LOCAL_PATHS", raising=False)
    return tmp_path / "cache"


def wait_for_jobs(timeout: float = 120) -> None:
    from ui import runtime

    for job in runtime.manager().jobs():
        assert job.wait(timeout), f"job {job.label} did not finish"


def open_app(base: Path | str, tuned: list[Path | str], page: str | None = None, **params: str) -> AppTest:
    """Open the app on a URL naming ``base`` and ``tuned``; return it once results are in."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["base"] = str(base)
    at.query_params["tuned"] = [str(t) for t in tuned]
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    wait_for_jobs()
    if page is not None:
        at.switch_page(PAGES[page])
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _decode(value):
    """Plotly's JSON packs numeric arrays as base64 ``{"dtype", "bdata", "shape"}``."""
    if isinstance(value, dict) and "bdata" in value and "dtype" in value:
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        return array.reshape([int(n) for n in str(shape).split(",")]) if shape else array
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def figures(at: AppTest) -> list[go.Figure]:
    """The Plotly figures on the page, as the browser receives them."""
    return [go.Figure(_decode(json.loads(chart.proto.spec))) for chart in at.get("plotly_chart")]


def metrics(at: AppTest) -> dict[str, str]:
    return {shown(m.label): m.value for m in at.metric}


@pytest.fixture(scope="module")
def engine_result(tiny_bert: Path, tiny_bert_lora: Path, tiny_bert_full_ft: Path):
    """The same comparison through the engine's public API, for cross-checking."""
    from analysis.compare import compare

    return compare(str(tiny_bert), [str(tiny_bert_lora), str(tiny_bert_full_ft)], cache=None)


def test_overview_shows_grids_and_totals_matching_the_engine(
    cache_dir: Path, tiny_bert: Path, tiny_bert_lora: Path, tiny_bert_full_ft: Path, engine_result
) -> None:
    at = open_app(tiny_bert, [tiny_bert_lora, tiny_bert_full_ft])
    assert [t.value for t in at.title] == ["Overview"]
    lora_panel, full_panel, totals = figures(at)
    lora_grid, full_grid = lora_panel.data[0], full_panel.data[0]
    lora, full = engine_result.models
    # Both panels share the block's modules; the LoRA adapter targets query and value only,
    # so its other cells are empty, and each of its cells is the engine's count.
    modules = ["query", "key", "value", "attn_out", "mlp_in", "mlp_out"]
    assert list(lora_panel.layout.xaxis.ticktext) == list(full_panel.layout.xaxis.ticktext) == modules
    assert list(lora_panel.layout.yaxis.ticktext) == list(full_panel.layout.yaxis.ticktext) == ["0", "1"]
    z = np.asarray(lora_grid.z, dtype=float)
    expected = [[m.intruder_counts(10, [0.5])[0] for m in lora.matrices[i : i + 2]] for i in (0, 2)]
    np.testing.assert_array_equal(z[:, [0, 2]], expected)
    assert np.isnan(z[:, [1, 3, 4, 5]]).all()
    assert not np.isnan(np.asarray(full_grid.z, dtype=float)).any()  # a full fine-tune changes every matrix
    assert [list(t.y) for t in totals.data] == [[lora.total_intruders(10, 0.5)], [full.total_intruders(10, 0.5)]]
    assert lora.total_intruders(10, 0.5) > 0 and full.total_intruders(10, 0.5) == 0
    table = at.dataframe[0].value
    assert list(table["intruders"]) == [lora.total_intruders(10, 0.5), 0]
    assert list(table["method"]) == ["LoRA r=4", ""]  # "bert_full_ft" already says full FT


def test_every_page_renders_its_charts(
    cache_dir: Path, tiny_bert: Path, tiny_bert_lora: Path, tiny_bert_full_ft: Path, engine_result
) -> None:
    at = open_app(tiny_bert, [tiny_bert_lora, tiny_bert_full_ft])
    lora = engine_result.models[0]
    first = lora.matrices[0]
    expected_titles = {
        "similarity": "Singular-vector similarity",
        "intruders": "Intruder dimensions vs ε",
        "effective_rank": "Effective rank of the updates",
        "spectrum": "Spectrum",
        "subspace": "Subspace similarity",
    }
    for page, title in expected_titles.items():
        at.switch_page(PAGES[page]).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert [t.value for t in at.title] == [title], page
        figs = figures(at)
        if page == "similarity":
            (fig,) = figs
            heat = next(t for t in fig.data if t.type == "heatmap")
            # The heatmap follows k (10 here): the top 10 x 10 block the engine computed.
            np.testing.assert_allclose(np.asarray(heat.z), first.similarity[:10, :10], atol=1e-6)
            assert metrics(at)["Intruder dimensions"] == str(first.intruder_counts(10, [0.5])[0])
        elif page == "intruders":
            (fig,) = figs
            assert [t.name for t in fig.data] == [
                f"{Path(tiny_bert_lora).name} (LoRA r=4)",
                Path(tiny_bert_full_ft).name,  # "..._full_ft" says the method already: not twice
            ]
            eps_index = list(fig.data[0].x).index(0.5)
            assert fig.data[0].y[eps_index] == lora.total_intruders(10, 0.5)
            assert list(fig.data[0].x) == list(DEFAULT_EPSILONS)
        elif page == "effective_rank":
            (fig,) = figs
            assert metrics(at)[Path(tiny_bert_lora).name] == f"{np.mean([m.effective_rank for m in lora.matrices]):.1f}"
        elif page == "spectrum":
            (fig,) = figs
            tuned = next(t for t in fig.data if t.name == "Wₜ (tuned)")
            np.testing.assert_allclose(tuned.y, first.tuned_singular_values, rtol=1e-6)
            assert metrics(at)["rank90 of ΔW"] == str(first.rank90)
        elif page == "subspace":
            phi_fig, amplification = figs
            assert "left singular vectors of ΔW" in phi_fig.layout.title.text
            assert np.asarray(phi_fig.data[0].z).shape[0] == first.rank90  # the LoRA update's rank, 4
            # One facet per module; both fine-tunes in the legend, once each.
            assert len([t for t in amplification.data if t.showlegend is not False]) == 2
            assert len({t.legendgroup for t in amplification.data}) == 2
        # Each page's tables download as CSV, and the full result as the JSON report.
        assert any(b.proto.label == "Download CSV" for b in at.get("download_button")), page
        assert any(b.proto.label == "Download JSON report" for b in at.sidebar.get("download_button")), page


def test_url_reproduces_the_view_and_follows_the_controls(
    cache_dir: Path, tiny_bert: Path, tiny_bert_lora: Path, tiny_bert_full_ft: Path
) -> None:
    name = "encoder.layer.1.attention.self.value.weight"
    at = open_app(
        tiny_bert,
        [tiny_bert_lora, tiny_bert_full_ft],
        page="similarity",
        matrix=name,
        k="7",
        eps="0.35",
        model=str(tiny_bert_full_ft),
    )
    assert at.sidebar.selectbox(key="w_matrix").value == name
    assert at.sidebar.selectbox(key="w_model").value == str(tiny_bert_full_ft)
    assert at.sidebar.slider(key="w_k").value == 7 and at.sidebar.slider(key="w_eps").value == 0.35
    fig = figures(at)[0]
    # The short label first (narrow screens), the tensor name on its own lines below it.
    assert fig.layout.title.text.startswith(f"{Path(tiny_bert_full_ft).name}: L")
    assert f"<br><sup>{name}</sup>" in fig.layout.title.text
    assert "top 7 at ε = 0.35" in fig.layout.title.text
    at.sidebar.slider(key="w_k").set_value(4).run()
    at.sidebar.selectbox(key="w_matrix").set_value("encoder.layer.0.attention.self.key.weight").run()
    assert at.query_params["k"] == "4"
    assert at.query_params["matrix"] == "encoder.layer.0.attention.self.key.weight"
    assert at.query_params["tuned"] == [str(tiny_bert_lora), str(tiny_bert_full_ft)]
    # The selection survives a page without these widgets and back.
    at.switch_page(PAGES["effective_rank"]).run()
    at.switch_page(PAGES["spectrum"]).run()
    assert at.sidebar.slider(key="w_k").value == 4
    assert at.sidebar.selectbox(key="w_matrix").value == "encoder.layer.0.attention.self.key.weight"


def test_open_matrix_fallback_switches_to_its_detail(
    cache_dir: Path, tiny_bert: Path, tiny_bert_lora: Path, tiny_bert_full_ft: Path
) -> None:
    at = open_app(tiny_bert, [tiny_bert_lora, tiny_bert_full_ft])
    at.selectbox(key="overview_open_model").set_value(str(tiny_bert_full_ft)).run()
    at.selectbox(key="overview_open_matrix").set_value("encoder.layer.1.intermediate.dense.weight").run()
    at.button(key="overview_open").click().run()
    assert [t.value for t in at.title] == ["Singular-vector similarity"]
    assert at.sidebar.selectbox(key="w_matrix").value == "encoder.layer.1.intermediate.dense.weight"
    assert at.sidebar.selectbox(key="w_model").value == str(tiny_bert_full_ft)


def test_models_page_says_what_was_understood(
    cache_dir: Path, tiny_bert: Path, tiny_bert_lora: Path, tiny_llama_lora: Path
) -> None:
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["base"] = str(tiny_bert)
    at.query_params["tuned"] = [str(tiny_bert_lora), str(tiny_llama_lora)]
    at.switch_page(PAGES["models"]).run()
    assert not at.exception
    understood = [shown(e.label) for e in at.expander]
    assert any(
        "BertModel (bert) · PEFT LoRA adapter, r = 4, α = 8 · 4 matrices matched" in label for label in understood
    ), understood
    errors = [shown(e.value) for e in at.error]
    assert len(errors) == 1 and errors[0].startswith(f"**{Path(tiny_llama_lora).name}**: ")
    assert at.button(key="analyse").disabled  # nothing runs while an input is wrong
    # Nothing heavy ran: the page only planned.
    from ui import runtime

    assert all(str(tiny_llama_lora) not in job.key for job in runtime.manager().jobs())


def test_models_page_without_demo_shows_the_command(cache_dir: Path) -> None:
    at = AppTest.from_file(APP, default_timeout=30)
    at.switch_page(PAGES["models"]).run()
    assert not at.exception
    assert any("python -m analysis demo" in i.value for i in at.info)
    assert at.button(key="build_demo")


def test_overview_without_models_points_to_the_models_page(cache_dir: Path) -> None:
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    assert at.info[0].value == "Choose a base model and at least one fine-tune first."


def _adapter_zip(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in folder.iterdir():
            archive.write(path, f"{folder.name}/{path.name}")
    return buffer.getvalue()


def test_upload_an_adapter_then_a_corrupt_file(cache_dir: Path, tiny_bert: Path, tiny_bert_lora: Path) -> None:
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["base"] = str(tiny_bert)
    at.switch_page(PAGES["models"]).run()
    at.file_uploader[0].set_value([("adapter.zip", _adapter_zip(tiny_bert_lora), "application/zip")])
    at.run()
    at.button(key="add_upload").click().run()
    assert not at.exception
    tuned = at.query_params["tuned"]  # one value: a string
    assert tuned.startswith("upload:") and len(tuned) == len("upload:") + 64
    assert shown(at.success[0].value).startswith("Added upload adapter.zip [")
    assert any("PEFT LoRA adapter, r = 4" in shown(e.label) for e in at.expander)

    weights = (tiny_bert_lora / "adapter_model.safetensors").read_bytes()
    at.file_uploader[0].set_value([("adapter_model.safetensors", weights[: len(weights) // 2], "")])
    at.run()
    at.button(key="add_upload").click().run()
    assert not at.exception
    (error,) = [shown(e.value) for e in at.error]
    assert error.startswith("Upload refused: adapter_model.safetensors: is truncated")
    assert at.query_params["tuned"] == tuned  # the good upload is still selected

    at.button(key="analyse").click().run()
    wait_for_jobs()
    at.switch_page(PAGES["similarity"]).run()
    assert not at.exception
    assert [t.value for t in at.title] == ["Singular-vector similarity"]
    assert "upload adapter.zip" in figures(at)[0].layout.title.text


def test_files_read_by_a_run_cut_short_are_noted_for_the_reaper(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tab closed during the run that follows choosing a file: Streamlit stops that run at
    its next step (``request_script_stop`` on disconnect), after the uploader's ``on_change``
    (check_pending) has read the files into session state and before the page body notes
    them (``upload_memory.hold_uploads``). Unnoted, the reaper let go of the upload manager's
    records but not of those values, which share the bytes: measured in a real server, a
    150 MiB file stayed in its memory 45 s after its tab closed (issue 26, item 3). The stop
    is stood in for by the first call of the body after the navigation (the demo's state)
    raising Streamlit's StopException."""
    from streamlit.runtime.scriptrunner_utils.exceptions import StopException

    from ui import demo_build, upload_memory

    at = AppTest.from_file(APP, default_timeout=30)
    at.switch_page(PAGES["models"]).run()
    at.file_uploader[0].set_value([("chosen-then-closed.safetensors", b"\1" * 1000, "")])

    def stopped():
        raise StopException

    monkeypatch.setattr(demo_build, "demo_state", stopped)
    at.run()
    read = upload_memory.chosen_files(at.session_state["uploader_0"])
    assert [f.name for f in read] == ["chosen-then-closed.safetensors"]  # the callback read it
    _, chosen, _ = upload_memory._chosen()
    noted = [f for values in chosen.values() for f in values if f.name == "chosen-then-closed.safetensors"]
    assert noted and all(any(f is n for n in noted) for f in read), "the values the run read are not noted"


def test_pickles_are_refused_in_the_page(cache_dir: Path) -> None:
    at = AppTest.from_file(APP, default_timeout=30)
    at.switch_page(PAGES["models"]).run()
    at.file_uploader[0].set_value([("pytorch_model.bin", b"\x80\x04junk", "")])
    at.run()
    at.button(key="add_upload").click().run()
    assert "uploads are never unpickled" in at.error[0].value


def test_local_paths_can_be_turned_off(cache_dir: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSE_ALLOW_LOCAL_PATHS", "0")
    at = AppTest.from_file(APP, default_timeout=30)
    at.query_params["base"] = str(tiny_bert)
    at.query_params["tuned"] = ["tiny-org/not-in-cache"]
    at.switch_page(PAGES["models"]).run()
    assert not at.exception
    assert any("local paths are disabled on this server" in e.value for e in at.error), [e.value for e in at.error]


def test_failed_analysis_shows_the_input_error(cache_dir: Path, tiny_bert: Path, tiny_llama_lora: Path) -> None:
    at = open_app(tiny_bert, [tiny_llama_lora])
    (error,) = at.error
    assert shown(error.value).startswith(f"**{Path(tiny_llama_lora).name}** could not be analysed: ")
    assert "Traceback" not in error.value


def test_json_report_matches_the_command_line_contract(tiny_bert: Path, tiny_bert_lora: Path, engine_result) -> None:
    from ui.state import Selection
    from ui.views import report_json

    lora = engine_result.models[0]
    selection = Selection(str(tiny_bert), (str(tiny_bert_lora),), str(tiny_bert_lora), None, None, k=7, eps=0.33)
    report = json.loads(report_json(selection, [lora]))
    assert report["base"] == str(tiny_bert) and report["top_k"] == 7
    assert report["epsilons"] == sorted([*DEFAULT_EPSILONS, 0.33])
    (model,) = report["models"]
    assert model["source"] == str(tiny_bert_lora) and model["kind"] == "adapter"
    first = model["matrices"][0]
    assert first["name"] == lora.matrices[0].name
    assert first["intruders"] == lora.matrices[0].intruder_counts(7, report["epsilons"])
    assert set(first) >= {"name", "layer", "module", "shape", "intruders", "effective_rank", "rank90",
                          "stable_rank", "delta_fro"}  # fmt: skip


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding a stand-in demo build (see tests/app_fixtures.py)."""
    from tests.app_fixtures import make_standin_demo

    cache = tmp_path_factory.mktemp("demo-cache")
    make_standin_demo(cache / "demo")
    return cache


def test_app_opens_on_the_demo(demo_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSE_CACHE_DIR", str(demo_cache))
    at = AppTest.from_file(APP, default_timeout=60).run()
    wait_for_jobs()
    at.run()
    assert not at.exception
    assert at.query_params["base"] == "demo:base"
    assert at.query_params["tuned"] == ["demo:full-ft", "demo:lora-r1", "demo:lora-r8"]
    totals = at.dataframe[0].value
    assert list(totals["model"]) == ["Full FT (stand-in)", "LoRA r=1 (stand-in)", "LoRA r=8 (stand-in)"]
    assert "method" not in totals.columns  # each label already says its method: no empty column
    assert list(totals["matrices"]) == [36, 12, 12]  # 6 blocks x 6 matrices; LoRA on query and value
    assert totals["intruders"].iloc[0] == 0 and totals["intruders"].iloc[2] > 0
    at.switch_page(PAGES["models"]).run()
    demo = at.dataframe[0].value
    assert [c for c in demo["spec"]] == ["demo:base", "demo:full-ft", "demo:lora-r1", "demo:lora-r8"]
    assert "rslora" not in demo.columns  # no demo model uses rsLoRA: no column of "False"


def test_progress_and_cancel_of_a_running_analysis(
    cache_dir: Path, tiny_bert: Path, tiny_bert_full_ft: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page joins a running job, shows its progress, and Cancel stops it (last watcher)."""
    import threading

    from analysis.errors import AnalysisCancelled
    from hosting.jobs import JobState, Progress
    from ui import runtime

    release = threading.Event()

    def slow(job):
        job.report(Progress(3, 12, "encoder.layer.0.attention.self.key.weight", 6.0))
        while not job.should_stop():
            release.wait(0.05)
        raise AnalysisCancelled("cancelled after 3 of 12 matrices")

    key = runtime.job_key(str(tiny_bert), str(tiny_bert_full_ft))
    job = runtime.manager().submit(key, slow, label="slow")
    at = AppTest.from_file(APP, default_timeout=30)
    at.query_params["base"] = str(tiny_bert)
    at.query_params["tuned"] = [str(tiny_bert_full_ft)]
    at.run()
    assert job.state is JobState.RUNNING and len(job.watchers) == 1  # the page joined, did not restart
    (bar,) = at.get("progress")
    assert bar.proto.value == 25
    assert shown(bar.proto.text) == f"{tiny_bert_full_ft.name}: 3 of 12 matrices, about 18 s left"
    at.button(key="cancel_jobs").click().run()
    assert job.wait(10) and job.state is JobState.CANCELLED
    at.run()
    assert shown(at.warning[0].value) == f"The analysis of **{tiny_bert_full_ft.name}** was cancelled."


def test_uploaded_adapter_of_an_unsupported_type_or_wrong_base_is_explained(
    cache_dir: Path, tiny_bert: Path, peft_adapter
) -> None:
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["base"] = str(tiny_bert)
    at.switch_page(PAGES["models"]).run()
    for kind, variant in (("bert", "ia3"), ("llama", "lora")):
        folder = peft_adapter(kind, variant)
        at.file_uploader[0].set_value([(p.name, p.read_bytes(), "") for p in sorted(folder.iterdir())])
        at.run()
        at.button(key="add_upload").click().run()
        assert not at.exception
    errors = [shown(e.value) for e in at.error]
    assert len(errors) == 2, errors
    assert all(e.startswith("**upload PEFT adapter [") for e in errors)
    assert "IA3" in errors[0] or "ia3" in errors[0].lower()
    assert "/uploads/" not in "".join(errors)  # no server folders in what a visitor reads
    assert "]**: adapter_config.json: peft_type is IA3" in errors[0]  # each thing said once
    assert at.button(key="analyse").disabled


def test_building_the_demo_shows_its_training_steps(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Models page starts a demo build in the background and shows its step count."""
    import threading

    import demo
    from analysis.errors import AnalysisCancelled
    from hosting.jobs import JobState
    from ui import demo_build

    stepped, calls = threading.Event(), []

    def build_demo(**kwargs):  # the real one trains for minutes; its callbacks are tested in test_demo
        calls.append(sorted(kwargs))
        kwargs["on_step"](30, 240, "full-ft loss 0.512")
        stepped.set()
        while not kwargs["should_stop"]():
            threading.Event().wait(0.05)
        raise AnalysisCancelled("the demo build was stopped after 30 of 240 training steps")

    monkeypatch.setattr(demo, "build_demo", build_demo)
    at = AppTest.from_file(APP, default_timeout=30)
    at.switch_page(PAGES["models"]).run()
    at.button(key="build_demo").click().run()
    assert stepped.wait(10)
    at.run()
    (bar,) = at.get("progress")
    assert bar.proto.value == 12 and bar.proto.text.startswith("Building the offline demo (0 of 4 fine-tunes ready)")
    assert calls == [["on_step", "progress", "should_stop"]]
    job = demo_build.demo_job()
    assert job is not None and job.label == "offline demo"
    job.cancel()
    assert job.wait(10) and job.state is JobState.CANCELLED


def test_models_page_counts_skipped_tensors_before_analyse(
    cache_dir: Path, tmp_path: Path, tiny_bert: Path, tiny_bert_full_ft: Path
) -> None:
    """A fine-tune missing one block matrix: the page says, before anything runs, how many
    matrices will be analysed and how many tensors are skipped, and why."""
    import shutil

    from safetensors.torch import load_file, save_file

    tuned = tmp_path / "missing-one"
    shutil.copytree(tiny_bert_full_ft, tuned)
    tensors = load_file(tuned / "model.safetensors")
    del tensors["encoder.layer.0.attention.self.key.weight"]
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["base"] = str(tiny_bert)
    at.query_params["tuned"] = [str(tuned)]
    at.switch_page(PAGES["models"]).run()
    assert not at.exception
    (label,) = [shown(e.label) for e in at.expander if "missing-one" in shown(e.label)]
    # 11 of the 12 block matrices; every other base tensor is listed with its reason (the
    # engine's own skipped list: 1-D weights, tensors outside the blocks, the missing one).
    # The title counts them; the reasons are listed inside, once each with its count.
    assert "· 11 matrices matched · 28 tensors skipped · stored as base fp32 (11)" in label, label
    skipped = next(d.value for d in at.dataframe if "reason" in d.value.columns)
    by_reason = {row["reason"]: row for row in skipped.to_dict("records")}
    assert sum(row["tensors"] for row in by_reason.values()) == 28
    missing = [row for reason, row in by_reason.items() if "not in the fine-tune" in reason]
    assert missing and missing[0]["tensors"] == 1
    assert missing[0]["examples"] == "encoder.layer.0.attention.self.key.weight"


# -- a hosted instance: crafted links and files end in messages ---------------------------
@pytest.mark.parametrize("base", ["~nosuchuser", "x" * 300, "org/name@.."])
def test_crafted_links_show_a_message_on_every_page(
    demo_cache: Path, monkeypatch: pytest.MonkeyPatch, base: str
) -> None:
    monkeypatch.setenv("WSE_CACHE_DIR", str(demo_cache))
    monkeypatch.setenv("WSE_ALLOW_LOCAL_PATHS", "0")
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["base"] = base
    at.query_params["tuned"] = ["demo:lora-r8"]
    at.run()
    wait_for_jobs()
    for page in (None, *PAGES.values()):
        if page is not None:
            at.switch_page(page)
        at.run()
        assert not at.exception, (page, [e.value for e in at.exception])
        shown = " ".join(e.value for e in at.error)
        assert at.error and str(demo_cache) not in shown and "site-packages" not in shown, (page, shown)


def test_malformed_adapter_through_a_shared_link(
    cache_dir: Path, tmp_path: Path, tiny_bert: Path, tiny_bert_lora: Path
) -> None:
    """lora_alpha "abc": the Models page and a shared link to the overview say so."""
    from ui import runtime

    config = json.loads((tiny_bert_lora / "adapter_config.json").read_text())
    files = [("adapter_config.json", json.dumps({**config, "lora_alpha": "abc"}).encode(), "")]
    files.append(("adapter_model.safetensors", (tiny_bert_lora / "adapter_model.safetensors").read_bytes(), ""))
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["base"] = str(tiny_bert)
    at.switch_page(PAGES["models"]).run()
    at.file_uploader[0].set_value(files)
    at.run()
    at.button(key="add_upload").click().run()
    assert not at.exception
    (error,) = [shown(e.value) for e in at.error]
    assert "lora_alpha must be a number, got 'abc'" in error and "/uploads/" not in error
    assert error.count("adapter_config.json") == 1
    spec = at.query_params["tuned"]
    shared = open_app(tiny_bert, spec if isinstance(spec, list) else [spec])
    assert "lora_alpha must be a number" in shown(shared.error[0].value)
    assert runtime.manager().jobs()


def test_demo_report_download_hides_server_paths(demo_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sysconfig

    from ui.state import Selection
    from ui.views import report_html, report_json

    monkeypatch.setenv("WSE_CACHE_DIR", str(demo_cache))
    monkeypatch.setenv("WSE_ALLOW_LOCAL_PATHS", "0")
    at = AppTest.from_file(APP, default_timeout=60).run()
    wait_for_jobs()
    at.run()
    from ui import runtime

    job = runtime.manager().get(runtime.job_key("demo:base", "demo:lora-r8"))
    lora = job.result
    raw = json.dumps(lora.summary)
    packages = os.path.realpath(sysconfig.get_paths()["purelib"])
    assert packages in raw  # the demo records the server's site-packages path ...
    text = report_json(Selection("demo:base", ("demo:lora-r8",), None, None, None, 10, 0.5), [lora])
    assert packages not in text and str(demo_cache) not in text  # ... which never reaches a visitor
    assert "<python packages>/" in text
    assert json.loads(text)["models"][0]["source"] == "demo:lora-r8"
    page = report_html(Selection("demo:base", ("demo:lora-r8",), None, None, None, 10, 0.5), [lora])
    assert packages not in page and str(demo_cache) not in page  # nor through the HTML report
    assert "<code>demo:lora-r8</code>" in page and 'id="provenance"' in page


def test_every_control_is_in_the_url(
    cache_dir: Path, tiny_bert: Path, tiny_bert_lora: Path, tiny_bert_full_ft: Path
) -> None:
    at = open_app(tiny_bert, [tiny_bert_lora, tiny_bert_full_ft], page="intruders", by="layer", modules="query")
    assert at.radio(key="w_by").value == "layer"
    modules = at.pills(key="w_modules")  # pills wrap: every module shows at 390 px (issue 25)
    assert modules.value == ["query"]
    assert list(modules.options) == ["query", "key", "value", "attn_out", "mlp_in", "mlp_out"]
    at.radio(key="w_by").set_value("module").run()
    at.multiselect(key="w_layers").set_value(["1"]).run()
    assert at.query_params["by"] == "module" and at.query_params["layers"] == "1"
    assert at.query_params["modules"] == "query"
    at.switch_page(PAGES["effective_rank"]).run()
    at.radio(key="w_measure").set_value("rank90").run()
    at.toggle(key="w_logrank").set_value(False).run()
    assert at.query_params["measure"] == "rank90" and at.query_params["logrank"] == "0"
    assert at.get("plotly_chart")[0].proto.spec and '"type":"log"' not in at.get("plotly_chart")[0].proto.spec
    at.switch_page(PAGES["subspace"]).run()
    at.toggle(key="w_logamp").set_value(False).run()
    assert at.query_params["logamp"] == "0"
    # A fresh visitor opening the same link sees the same controls.
    params = {k: at.query_params[k] for k in ("by", "modules", "layers", "measure", "logrank", "logamp")}
    again = open_app(tiny_bert, [tiny_bert_lora, tiny_bert_full_ft], page="intruders", **params)
    assert again.radio(key="w_by").value == "module" and again.multiselect(key="w_layers").value == ["1"]
    again.switch_page(PAGES["effective_rank"]).run()
    assert again.radio(key="w_measure").value == "rank90" and again.toggle(key="w_logrank").value is False
    again.switch_page(PAGES["subspace"]).run()
    assert again.toggle(key="w_logamp").value is False
    assert {k: again.query_params[k] for k in params} == params
    # Every control of every analysis page is bound to the view (ui.state.widget, key w_<part>),
    # so none can be missing from the address bar.
    for page in ("intruders", "effective_rank", "spectrum", "similarity", "subspace"):
        again.switch_page(PAGES[page]).run()
        assert not again.exception, [e.value for e in again.exception]
        kinds = ("radio", "selectbox", "multiselect", "slider", "select_slider", "checkbox", "toggle", "number_input")
        kinds += ("button_group",)
        loose = [(page, kind, w.key) for kind in kinds for w in again.get(kind) if not str(w.key).startswith("w_")]
        assert not loose, loose
    overview = open_app(tiny_bert, [tiny_bert_lora], metric="effective_rank")
    assert not overview.exception
    assert overview.query_params["metric"] == "effective_rank"


def test_refused_uploads_are_cleared_and_quotas_hold(
    cache_dir: Path, tiny_bert_lora: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WSE_UPLOADS_PER_VISITOR", "1")
    weights = (tiny_bert_lora / "adapter_model.safetensors").read_bytes()
    at = AppTest.from_file(APP, default_timeout=60)
    at.switch_page(PAGES["models"]).run()
    at.file_uploader[0].set_value([("adapter_model.safetensors", weights[: len(weights) // 2], "")])
    at.run()
    at.button(key="add_upload").click().run()
    assert "is truncated" in at.error[0].value
    assert not at.file_uploader[0].value  # cleared: the next try starts afresh, not "uploaded twice"
    good = [(p.name, p.read_bytes(), "") for p in sorted(tiny_bert_lora.iterdir())]
    at.file_uploader[0].set_value(good)
    at.run()
    at.button(key="add_upload").click().run()
    assert not [e for e in at.error if "Upload refused" in e.value]
    assert any("Added upload" in s.value for s in at.success)
    at.file_uploader[0].set_value(good)
    at.run()
    assert any("Upload refused: your uploads: one visitor may add at most 1" in shown(e.value) for e in at.error)
    assert not at.file_uploader[0].value  # over the quota: not even held until "Add"


def test_first_start_builds_the_demo_in_the_page_and_shows_each_fine_tune_when_ready(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh server opens at once, trains the demo in the background with progress and
    selects each fine-tune as soon as it exists; Stop keeps what was built."""
    import threading

    import demo
    from analysis.errors import AnalysisCancelled
    from hosting.jobs import JobState
    from tests.app_fixtures import make_standin_demo
    from ui import demo_build, runtime

    monkeypatch.setenv("WSE_DEMO_AUTOBUILD", "1")
    publish, published = threading.Event(), threading.Event()

    def build_demo(**kwargs):  # stands in for training: one fine-tune "finishes" when told
        kwargs["on_step"](10, 240, "full-ft loss 0.5")
        assert publish.wait(120)
        manifest = make_standin_demo(cache_dir / "demo")
        data = json.loads((cache_dir / "demo" / demo.MANIFEST_NAME).read_text())
        data.update(complete=False, fine_tunes=data["fine_tunes"][:1])
        (cache_dir / "demo" / demo.MANIFEST_NAME).write_text(json.dumps(data))
        kwargs["on_step"](70, 240, "lora-r1 loss 0.9")
        published.set()
        while not kwargs["should_stop"]():
            threading.Event().wait(0.05)
        raise AnalysisCancelled(f"stopped ({manifest.root.name})")

    monkeypatch.setattr(demo, "build_demo", build_demo)
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    job = demo_build.demo_job()
    assert job is not None and not job.state.finished  # started by opening the app
    at.run()
    (bar,) = at.get("progress")
    assert bar.proto.text.startswith("Building the offline demo (0 of 4 fine-tunes ready)")
    assert not at.info  # no "choose a model": the page says the demo is coming
    publish.set()
    assert published.wait(120)
    at.run()  # the fragment notices the new fine-tune and redraws; the selection follows
    at.run()
    assert at.query_params["base"] in ("demo:base", ["demo:base"])
    assert at.query_params["tuned"] in ("demo:full-ft", ["demo:full-ft"])
    at.button(key="cancel_demo").click().run()
    assert job.wait(10) and job.state is JobState.CANCELLED
    assert [m.name for m in demo.demo_manifest(cache_dir / "demo").fine_tunes] == ["full-ft"]
    for analysis in runtime.manager().jobs():  # the analysis it started is not under test here
        analysis.cancel()
        assert analysis.wait(60)


def test_models_page_lists_each_expert_of_a_fused_tensor_once(cache_dir: Path, tmp_path: Path) -> None:
    """The plan preview names every matrix by its key: the experts of one fused tensor are
    as many rows as experts, each its own ``name#expert``."""
    import copy

    from tests import families

    families.quiet()
    model = families.build("qwen3_moe_fused")
    base = families.save(model, "qwen3_moe_fused", tmp_path / "base")
    tuned_model = copy.deepcopy(model)
    families.perturb(tuned_model)
    tuned = families.save(tuned_model, "qwen3_moe_fused", tmp_path / "full")
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["base"] = str(base)
    at.query_params["tuned"] = [str(tuned)]
    at.switch_page(PAGES["models"]).run()
    assert not at.exception, [e.value for e in at.exception]
    matrices = next(d.value for d in at.dataframe if "adapter rank" in d.value.columns)
    experts = matrices[matrices["expert"].notna()]
    assert len(experts) > experts["matrix"].str.split("#").str[0].nunique()  # several per tensor
    assert matrices["matrix"].is_unique
    assert set(experts["matrix"]) == {
        f"{n}#{int(e)}" for n, e in zip(experts["matrix"].str.split("#").str[0], experts["expert"], strict=True)
    }


def test_effective_rank_page_totals_follow_the_chosen_measure(
    cache_dir: Path, tiny_bert: Path, tiny_bert_lora: Path, tiny_bert_full_ft: Path, engine_result
) -> None:
    """With rank90 chosen, the per-fine-tune numbers over the chart still gave the mean
    effective rank (the demo's full fine-tune: 222.4 beside a chart of rank90 near 90), and
    their caption did not say of what."""
    at = open_app(tiny_bert, [tiny_bert_lora, tiny_bert_full_ft], page="effective_rank", measure="rank90")
    assert at.radio(key="w_measure").value == "rank90"
    full = engine_result.models[1]
    rank90 = f"{np.mean([m.rank90 for m in full.matrices]):.1f}"
    assert rank90 != f"{np.mean([m.effective_rank for m in full.matrices]):.1f}"
    assert metrics(at)[Path(tiny_bert_full_ft).name] == rank90
    assert any(c.value.startswith("rank90 of ΔW, mean of") for c in at.caption)
    at.radio(key="w_measure").set_value("effective_rank").run()
    effective = f"{np.mean([m.effective_rank for m in full.matrices]):.1f}"
    assert metrics(at)[Path(tiny_bert_full_ft).name] == effective
    assert any(c.value.startswith("effective rank of ΔW, mean of") for c in at.caption)
