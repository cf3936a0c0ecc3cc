"""Reading a finished comparison from the cache alone (the dashboard's web process, issues 25/26).

A page opened on analyses done before draws them without waiting for a worker process:
:func:`analysis.pipeline.cached_results` reads every matrix's result from the cache, or
gives ``None`` at the first one that is not there, having loaded, hashed and computed
nothing. What it reads must be exactly what the analysis gives.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from analysis.cache import SpectrumCache
from analysis.compare import compare
from analysis.model_sparsity import add_whole_model_sparsity
from analysis.pair_metrics import AnalysisSettings
from analysis.pipeline import analyse_plan, cached_results, model_result
from analysis.report import to_report
from analysis.results import DEFAULT_EPSILONS, DEFAULT_TOP_K, ComparisonResult
from analysis.specs import SpecResolver
from hosting.jobs import JobManager, JobState, cached_comparison
from tests import factories

SETTINGS = AnalysisSettings()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cached-read")
    base = factories.make_llama(root / "base", seed=0)
    return {
        "base": base,
        "full": factories.make_full_finetune(base, root / "full", seed=1),
        "lora": factories.make_lora_adapter(base, root / "lora", r=4, seed=2, factor_std=0.3),
    }


def _report(plan, matrices) -> bytes:
    result = ComparisonResult(
        str(plan.base_label), DEFAULT_TOP_K, list(DEFAULT_EPSILONS), [model_result(plan, matrices)]
    )
    return json.dumps(to_report(result), sort_keys=True).encode()


class NoLoads:
    """Wraps a plan's loaders so a test fails if a weight is read."""

    def __init__(self, plan) -> None:
        self.loads = 0
        plan.matrices = [
            replace(m, load_base=self._counting(m.load_base), load_tuned=self._counting(m.load_tuned))
            for m in plan.matrices
        ]

    def _counting(self, load):
        def wrapped():
            self.loads += 1
            return load()

        return wrapped


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_cached_read_equals_the_analysis_and_reads_no_weight(models, tmp_path, kind) -> None:
    resolver = SpecResolver(allow_local_paths=True)
    cache = SpectrumCache(tmp_path / "spectra")
    plan = resolver.plan(str(models["base"]), str(models[kind]))
    watch = NoLoads(plan)
    assert cached_results(plan, SETTINGS, cache) is None  # cold: nothing there
    assert watch.loads == 0 and cache.fingerprints.hashed == 0

    analysed = list(analyse_plan(plan, settings=SETTINGS, cache=cache, device="cpu"))
    loads_of_the_analysis = watch.loads
    assert loads_of_the_analysis > 0

    # A fresh process's view: a new cache object (its fingerprint index read from disk).
    fresh = SpectrumCache(tmp_path / "spectra")
    plan_again = resolver.plan(str(models["base"]), str(models[kind]))
    watch_again = NoLoads(plan_again)
    read = cached_results(plan_again, SETTINGS, fresh)
    assert read is not None and len(read) == len(plan_again.matrices)
    assert watch_again.loads == 0 and fresh.fingerprints.hashed == 0
    assert _report(plan_again, read) == _report(plan, analysed)


def test_one_matrix_missing_gives_none(models, tmp_path) -> None:
    resolver = SpecResolver(allow_local_paths=True)
    cache = SpectrumCache(tmp_path / "spectra")
    plan = resolver.plan(str(models["base"]), str(models["full"]))
    list(analyse_plan(plan, settings=SETTINGS, cache=cache, device="cpu"))
    pair_entries = sorted(p for p in cache.entries() if p.parent.parent.name == "pair")
    assert len(pair_entries) == len(plan.matrices)
    pair_entries[len(pair_entries) // 2].unlink()  # one matrix's result gone
    assert cached_results(resolver.plan(str(models["base"]), str(models["full"])), SETTINGS, cache) is None


def test_other_settings_are_not_read_as_these(models, tmp_path) -> None:
    resolver = SpecResolver(allow_local_paths=True)
    cache = SpectrumCache(tmp_path / "spectra")
    plan = resolver.plan(str(models["base"]), str(models["lora"]))
    list(analyse_plan(plan, settings=SETTINGS, cache=cache, device="cpu"))
    other = AnalysisSettings(similarity_size=SETTINGS.similarity_size + 8)
    assert cached_results(resolver.plan(str(models["base"]), str(models["lora"])), other, cache) is None


def test_fingerprint_index_sees_digests_another_process_wrote(models, tmp_path) -> None:
    """The web process looked before a worker hashed the files: it must look again on disk."""
    resolver = SpecResolver(allow_local_paths=True)
    web = SpectrumCache(tmp_path / "spectra")
    plan = resolver.plan(str(models["base"]), str(models["full"]))
    assert cached_results(plan, SETTINGS, web) is None  # the web process's index: nothing yet
    worker = SpectrumCache(tmp_path / "spectra")
    list(analyse_plan(resolver.plan(str(models["base"]), str(models["full"])), settings=SETTINGS, cache=worker))
    assert cached_results(resolver.plan(str(models["base"]), str(models["full"])), SETTINGS, web) is not None


def test_cached_comparison_only_for_models_on_this_machine(models, tmp_path) -> None:
    resolver = SpecResolver(allow_local_paths=True)
    cache = SpectrumCache(tmp_path / "spectra")
    base, full = str(models["base"]), str(models["full"])
    assert cached_comparison(resolver, base, full, settings=SETTINGS, cache=cache) is None  # not analysed yet
    plan = resolver.plan(base, full)
    model = model_result(plan, list(analyse_plan(plan, settings=SETTINGS, cache=cache)))
    # The matrices alone are not the whole comparison: its job also counts the whole model's sparsity.
    assert cached_comparison(resolver, base, full, settings=SETTINGS, cache=cache) is None
    add_whole_model_sparsity(model, plan, SETTINGS, cache)
    found = cached_comparison(resolver, base, full, settings=SETTINGS, cache=cache)
    assert found is not None and found.source == full and found.matrices
    assert found.summary["whole_model_sparsity"] == model.summary["whole_model_sparsity"]
    # A hub id is resolved online by its job, never here; bad and missing names give None too.
    assert cached_comparison(resolver, base, "some-org/some-model", settings=SETTINGS, cache=cache) is None
    assert cached_comparison(resolver, base, str(tmp_path / "nowhere"), settings=SETTINGS, cache=cache) is None
    assert cached_comparison(resolver, base, "series:" + full, settings=SETTINGS, cache=cache) is None
    # Local paths off (a hosted server): the same folders are not read.
    hosted = SpecResolver(allow_local_paths=False)
    assert cached_comparison(hosted, base, full, settings=SETTINGS, cache=cache) is None


def test_the_whole_model_sparsity_is_read_as_the_report_counted_it(models, tmp_path) -> None:
    """The command line's report stored every count: a page reads the same whole-model figure, hashing nothing."""
    base, full = str(models["base"]), str(models["full"])
    report = compare(base, [full], cache=SpectrumCache(tmp_path / "spectra"), device="cpu").models[0]
    fresh = SpectrumCache(tmp_path / "spectra")
    found = cached_comparison(SpecResolver(allow_local_paths=True), base, full, settings=SETTINGS, cache=fresh)
    assert found is not None and fresh.fingerprints.hashed == 0
    whole = report.summary["whole_model_sparsity"]
    assert whole["other_tensors"] > 0 and found.summary["whole_model_sparsity"] == whole


def test_a_finished_job_is_joined_like_a_computed_one() -> None:
    manager = JobManager(max_workers=1)
    try:
        job = manager.finished(("k",), "the result", label="x", watcher="tab-1")
        assert job.state is JobState.DONE and job.result == "the result" and job.wait(0)
        assert manager.submit(("k",), lambda j: "computed", watcher="tab-2") is job  # nothing runs
        assert job.watchers == {"tab-1", "tab-2"}
        assert manager.finished(("k",), "another", watcher="tab-3") is job
    finally:
        manager.shutdown()


def test_a_model_never_hashed_is_not_planned_in_the_web_process(models, tmp_path, monkeypatch) -> None:
    """A cold comparison goes to its worker at once: planning it here would import the
    model's transformers classes in the web process (seconds every page's first run waited
    for, eight visitors at once). Once its files are hashed, it is planned and read."""
    base, full = str(models["base"]), str(models["full"])
    resolver, cache = SpecResolver(allow_local_paths=True), SpectrumCache(tmp_path / "spectra")
    planned = []
    plan = resolver.plan
    monkeypatch.setattr(resolver, "plan", lambda *a, **k: planned.append(a) or plan(*a, **k))
    assert cached_comparison(resolver, base, full, settings=SETTINGS, cache=cache) is None
    assert planned == []
    compare(base, [models["lora"]], cache=cache, device="cpu")  # the base hashed, this fine-tune not
    assert cached_comparison(resolver, base, full, settings=SETTINGS, cache=cache) is None
    assert planned == []
    compare(base, [full], cache=cache, device="cpu")
    assert cached_comparison(resolver, base, full, settings=SETTINGS, cache=cache) is not None
    assert len(planned) == 1
