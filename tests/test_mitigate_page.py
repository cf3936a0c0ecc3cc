"""The Mitigate page in Streamlit's AppTest, on tiny real models: the numbers are the
engine's, the URL holds the view, progress and Cancel work like elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from analysis.mitigation import MitigationSettings, run
from analysis.specs import SpecResolver
from charts import mitigation as fm
from tests import factories
from tests.test_app import APP, figures, metrics, wait_for_jobs

PAGE = "pages/mitigate.py"


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("WSE_ALLOW_LOCAL_PATHS", raising=False)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def adapter(tiny_bert: Path, model_root: Path) -> Path:
    return factories.make_lora_adapter(tiny_bert, model_root / "page-lora", "mlp", r=4, factor_std=0.3)


def _open(base: Path, *tuned: Path, **params: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["base"] = str(base)
    at.query_params["tuned"] = [str(t) for t in tuned]
    for key, value in params.items():
        at.query_params[key] = value
    at.switch_page(PAGE).run()
    wait_for_jobs()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_page_shows_the_engines_numbers_and_keeps_the_view_in_the_url(cache_dir, tiny_bert, adapter) -> None:
    at = _open(tiny_bert, adapter, lam="0.5", rule="top1", k="10", eps="0.5", curve="0")
    expected = run(
        SpecResolver(allow_local_paths=True),
        str(tiny_bert),
        str(adapter),
        MitigationSettings(lam=0.5, top_k=10, eps=0.5, rule="top1"),
        cache=None,
    )
    shown = metrics(at)
    assert shown["Intruders scaled"] == str(expected.mitigation.totals()["intruders_scaled"])
    counts = expected.counts([0.5], 10)
    assert shown["Intruders at ε = 0.5"] == str(counts["after"][0])
    # The card's error has the per-matrix table column's digits ("0.00 %", not "%.3g")
    assert shown["Re-factorisation error"] == fm.refactor_text(expected.mitigation.totals())
    sweep, spectra = figures(at)[:2]
    assert list(sweep.data[0].y) == expected.counts()["before"]
    assert list(sweep.data[1].y) == expected.counts()["after"]
    assert len(spectra.data) >= 3
    table = at.dataframe[0].value
    assert list(table["scaled"]) == [len(m.intruders) for m in expected.mitigation.matrices]
    assert set(table["scaled"]) <= {0, 1}  # top1
    assert {"stack", "expert"}.isdisjoint(table.columns)  # BERT: one stack, no experts (the CSV keeps them)
    assert at.dataframe[0].proto.placeholder == "—"  # a missing value reads as a dash, not "None"
    assert {"stack", "expert"} <= set(fm.matrices_table(expected, 10, 0.5).columns)
    assert not [i for i in at.info if "nothing was scaled" in i.value]
    labels = [b.label for b in at.get("download_button")]
    assert "Mitigated adapter (PEFT folder, zip)" in labels and "Merged model (safetensors, zip)" in labels
    params = at.query_params
    assert (params["lam"], params["rule"], params["curve"]) == ("0.5", "top1", "0")
    # Moving lambda starts the new mitigation and rewrites the URL.
    at.slider(key="w_lam").set_value(0.0).run()
    wait_for_jobs()
    at.run()
    assert at.query_params["lam"] == "0"
    zero = run(
        SpecResolver(allow_local_paths=True),
        str(tiny_bert),
        str(adapter),
        MitigationSettings(lam=0.0, rule="top1"),
        cache=None,
    )
    assert metrics(at)["Intruders at ε = 0.5"] == str(zero.counts([0.5])["after"][0])
    assert any("No trade-off curve" in c.value or "Trade-off curve" in c.value for c in at.caption)
    # At a tiny eps no vector is an intruder: the page says nothing was scaled, and why.
    none = run(SpecResolver(allow_local_paths=True), str(tiny_bert), str(adapter),
               MitigationSettings(lam=0.0, eps=0.05, rule="top1"), cache=None)  # fmt: skip
    assert none.mitigation.totals()["intruders_scaled"] == 0
    at.slider(key="w_eps").set_value(0.05).run()
    wait_for_jobs()
    at.run()
    assert metrics(at)["Intruders scaled"] == "0"
    assert [i for i in at.info if "nothing was scaled" in i.value]


def test_the_page_opens_on_a_fine_tune_worth_mitigating_without_running_the_model(
    cache_dir, tiny_bert, tiny_bert_full_ft, adapter
) -> None:
    """Issue 25: with a full fine-tune first (no intruders to scale), the page opens on the
    LoRA, the trade-off curve off until asked for, and says why scaled intruders still count."""
    at = _open(tiny_bert, tiny_bert_full_ft, adapter)
    assert at.selectbox(key="w_model").value == str(adapter)
    assert at.checkbox(key="w_curve").value is False
    from ui import runtime

    assert not [j for j in runtime.manager().jobs() if j.key[0] == "mitigate" and j.key[4]]  # no curve job
    scaled = int(metrics(at)["Intruders scaled"])
    assert scaled > 0
    assert any("keeps its direction" in c.value for c in at.caption)
    assert "+0.0 %" not in str([m.proto.delta for m in at.metric])
    at.button(key="mit_run_curve").click().run()
    assert at.query_params["curve"] == "1" and at.checkbox(key="w_curve").value is True
    wait_for_jobs()


def test_progress_and_cancel_of_a_running_mitigation(cache_dir, tiny_bert, adapter) -> None:
    import threading

    from analysis.cache import default_cache_dir
    from analysis.errors import AnalysisCancelled
    from hosting.jobs import JobState, Progress
    from hosting.mitigation_jobs import mitigation_key as job_key
    from ui import runtime

    release = threading.Event()

    def slow(job):
        job.report(Progress(2, 8, "encoder.layer.0.attention.self.query.weight", 4.0))
        while not job.should_stop():
            release.wait(0.05)
        raise AnalysisCancelled("cancelled")

    settings = MitigationSettings(lam=0.75, top_k=10, eps=0.5, rule="peft")
    resolver = runtime.resolver()
    versions = (resolver.version(str(tiny_bert)), resolver.version(str(adapter)))
    key = (*job_key(str(tiny_bert), str(adapter), settings, True, runtime.device()), str(default_cache_dir()), versions)
    job = runtime.manager().submit(key, slow, label="slow")
    at = AppTest.from_file(APP, default_timeout=30)
    at.query_params["base"] = str(tiny_bert)
    at.query_params["tuned"] = [str(adapter)]
    at.query_params["curve"] = "1"  # the job above is the one with the curve
    at.switch_page(PAGE).run()
    assert job.state is JobState.RUNNING and len(job.watchers) == 1
    (bar,) = at.get("progress")
    # A job without its own clock: no time left is invented, the bar stands at 2 of 8 steps.
    assert bar.proto.value == 25 and "step 2 of 8, estimating the time left" in bar.proto.text
    at.button(key="cancel_mitigation").click().run()
    assert job.wait(10) and job.state is JobState.CANCELLED
    at.run()
    assert at.warning[0].value == "The mitigation was cancelled."


def test_a_fresh_visitor_opening_the_link_sees_the_same_controls(cache_dir, tiny_bert, adapter) -> None:
    """Every Mitigate control goes through the one view (ui.state): changed by the visitor,
    it is in the address bar, and the link opens the same controls for someone else."""
    at = _open(tiny_bert, adapter, curve="0")
    assert at.slider(key="w_lam").value == 0.75 and at.radio(key="w_rule").value == "peft"
    assert at.checkbox(key="w_exact").value is False and at.checkbox(key="w_curve").value is False
    at.radio(key="w_rule").set_value("top1").run()
    at.checkbox(key="w_exact").check().run()
    at.slider(key="w_lam").set_value(0.25).run()
    wait_for_jobs()
    at.run()
    picker = at.selectbox(key="w_matrix")
    picker.select_index(len(picker.options) - 1).run()
    last = at.selectbox(key="w_matrix").value  # a matrix key; the options show where it lives
    assert not at.exception, [e.value for e in at.exception]
    params = {key: at.query_params[key] for key in ("lam", "rule", "exact", "curve", "matrix", "k", "eps")}
    assert params == {
        "lam": "0.25",
        "rule": "top1",
        "exact": "1",
        "curve": "0",
        "matrix": last,
        "k": "10",
        "eps": "0.5",
    }
    again = _open(tiny_bert, adapter, **params)
    assert again.slider(key="w_lam").value == 0.25 and again.radio(key="w_rule").value == "top1"
    assert again.checkbox(key="w_exact").value is True and again.checkbox(key="w_curve").value is False
    assert again.selectbox(key="w_matrix").value == last
    assert {key: again.query_params[key] for key in params} == params
    # A link with values the page does not know opens on the defaults, without an error; a
    # matrix that was not mitigated shows the most scaled one (and stays in the link).
    odd = _open(tiny_bert, adapter, lam="nan", rule="nonsense", exact="maybe", curve="0", matrix="no.such.weight")
    assert odd.slider(key="w_lam").value == 0.75 and odd.radio(key="w_rule").value == "peft"
    assert odd.checkbox(key="w_exact").value is False
    table = odd.dataframe[0].value
    assert odd.selectbox(key="w_matrix").value == table.loc[table["scaled"].idxmax(), "matrix"]
    assert odd.query_params["matrix"] == "no.such.weight"


def test_the_link_names_the_fine_tune_the_page_opened_on(cache_dir, tiny_bert, tiny_bert_full_ft, adapter) -> None:
    """Opened with no fine-tune named, the page shows the LoRA (the one worth mitigating) but
    its address bar named the first fine-tune, the full one: the link opened another view."""
    at = _open(tiny_bert, tiny_bert_full_ft, adapter)
    assert at.selectbox(key="w_model").value == str(adapter)
    assert at.query_params["model"] == str(adapter)
    again = AppTest.from_file(APP, default_timeout=60)
    for key, value in dict(at.query_params).items():
        again.query_params[key] = value
    again.switch_page(PAGE).run()
    wait_for_jobs()
    again.run()
    assert again.selectbox(key="w_model").value == str(adapter)


def test_the_shell_line_names_the_models_shown(cache_dir, tiny_bert, adapter) -> None:
    """The caption's command line said ``mitigate BASE TUNED``: the models the page shows are
    named in it, ready to paste (an upload, which the shell cannot name, keeps the word)."""
    import shlex

    from ui import mitigation

    at = _open(tiny_bert, adapter, curve="0")
    line = next(c.value for c in at.caption if "The same from the shell" in c.value)
    assert f"python -m analysis mitigate {shlex.quote(str(tiny_bert))} {shlex.quote(str(adapter))} --lam 0.75" in line
    upload = mitigation.shell_command("demo:base", "upload:abc123", MitigationSettings(lam=0.5, top_k=10, eps=0.5))
    assert upload.startswith("python -m analysis mitigate demo:base TUNED --lam 0.5 --top-k 10 --eps 0.5")
