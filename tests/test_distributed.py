"""Scale-out on Ray (analysis/distributed.py) on a real local Ray instance.

One Ray instance for the module (``ray.init(num_cpus=2, include_dashboard=False)``, a few
seconds to start), real tiny models, the local engine as the reference: results must be
equal field by field. A worker process is killed with SIGKILL while it runs a task (Ray
retries the task), and a run is cancelled half way (outstanding tasks are cancelled, the
finished ones kept).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.torch import load_file, save_file

from analysis import distributed
from analysis.cache import SpectrumCache
from analysis.compare import compare, plan_models
from analysis.errors import AnalysisCancelled, InputError
from analysis.results import ComparisonResult, MatrixResult
from cli import main
from tests import factories

ray = pytest.importorskip("ray")
# One Ray instance per module: keep these tests on one xdist worker (with --dist loadgroup).
pytestmark = pytest.mark.xdist_group("ray")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    yield
    ray.shutdown()


def assert_same_matrix(local: MatrixResult, far: MatrixResult) -> None:
    for f in dataclasses.fields(MatrixResult):
        a, b = getattr(local, f.name), getattr(far, f.name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), f.name
        else:
            assert a == b, (f.name, a, b)


def assert_same(local: ComparisonResult, far: ComparisonResult) -> None:
    assert len(local.models) == len(far.models)
    for lm, fm in zip(local.models, far.models, strict=True):
        assert (lm.source, lm.kind, lm.unmatched, lm.shape_mismatches, lm.summary) == (
            fm.source,
            fm.kind,
            fm.unmatched,
            fm.shape_mismatches,
            fm.summary,
        )
        assert [m.name for m in lm.matrices] == [m.name for m in fm.matrices]
        for a, b in zip(lm.matrices, fm.matrices, strict=True):
            assert_same_matrix(a, b)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A llama with 512-wide matrices (14 pairs, ~0.1-0.3 s each on one core) and a full
    fine-tune: tasks long enough to be caught running."""
    root = tmp_path_factory.mktemp("wide")
    base = factories.make_llama(root / "base", hidden_size=256, intermediate_size=512)
    return base, factories.make_full_finetune(base, root / "ft")


def test_results_equal_the_local_engine_and_workers_fill_the_shared_cache(
    tiny_llama: Path, tiny_llama_full_ft: Path, tiny_llama_lora: Path, tmp_path: Path
) -> None:
    specs = [str(tiny_llama_full_ft), str(tiny_llama_lora)]
    local = compare(str(tiny_llama), specs, cache=None)
    cache = SpectrumCache(tmp_path / "spectra")
    stats = distributed.RayRunStats()
    events = []
    far = distributed.compare(str(tiny_llama), specs, address=None, cache=cache, progress=events.append, stats=stats)
    assert_same(local, far)
    assert stats.cache_mode == "shared" and stats.finished == stats.tasks and stats.cancelled == 0
    # Progress per model, as tasks finished.
    for model in far.models:
        done = [e.done for e in events if e.model == model.source]
        assert done == list(range(1, len(model.matrices) + 1))
    # The workers wrote into the shared cache: one base entry per base matrix (the two
    # fine-tunes share it), one pair entry per pair; a local run now reads everything.
    entries = {
        kind: len(list((cache.root / f"v{_version()}" / kind).rglob("*.safetensors"))) for kind in ("base", "pair")
    }
    assert entries == {"base": len(local.models[0].matrices), "pair": sum(len(m.matrices) for m in local.models)}
    again = SpectrumCache(tmp_path / "spectra")
    assert_same(local, compare(str(tiny_llama), specs, cache=again))
    # pairs, their measures, and the full fine-tune's whole-model counts (written by the Ray run's driver)
    assert again.stats.hits == 2 * entries["pair"] + 1 and again.stats.misses == 0


def _version() -> str:
    from analysis import ALGORITHM_VERSION

    return str(ALGORITHM_VERSION)


def test_driver_writes_results_when_the_cache_is_not_shared(
    tiny_llama: Path, tiny_llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WSE_RAY_SHARED_CACHE", "0")
    monkeypatch.setenv("WSE_RAY_NODE_CACHE", str(tmp_path / "node"))  # read by the driver, sent to the tasks
    cache = SpectrumCache(tmp_path / "driver")
    stats = distributed.RayRunStats()
    far = distributed.compare(str(tiny_llama), [str(tiny_llama_lora)], address=None, cache=cache, stats=stats)
    assert stats.cache_mode == "driver"
    pairs = len(far.models[0].matrices)
    assert len(list((cache.root / f"v{_version()}" / "pair").rglob("*.safetensors"))) == pairs
    assert not (cache.root / f"v{_version()}" / "base").exists()  # base spectra stay on the nodes
    assert len(list((tmp_path / "node" / "spectra" / f"v{_version()}" / "base").rglob("*.safetensors"))) == pairs
    local = SpectrumCache(tmp_path / "driver")
    assert_same(far, compare(str(tiny_llama), [str(tiny_llama_lora)], cache=local))
    assert local.stats.hits == 2 * pairs and local.stats.misses == 0  # pairs and their measures


def test_dashboard_jobs_run_on_ray_when_asked(tiny_llama: Path, tiny_llama_lora: Path, tmp_path: Path) -> None:
    from analysis.pair_metrics import AnalysisSettings
    from analysis.specs import SpecResolver
    from hosting.jobs import JobManager, JobState, comparison_job
    from hosting.uploads import UploadStore

    resolver = SpecResolver(uploads=UploadStore(tmp_path / "uploads"), demo_root=tmp_path / "demo")
    base, tuned = str(tiny_llama), str(tiny_llama_lora)
    manager = JobManager()
    try:
        fn = comparison_job(
            resolver, base, tuned, settings=AnalysisSettings(), cache=SpectrumCache(tmp_path / "s"), ray_address="auto"
        )
        job = manager.submit("ray-job", fn)
        assert job.wait(120) and job.state is JobState.DONE, job.error
    finally:
        manager.shutdown()
    local = compare(base, [tuned], cache=None).models[0]
    assert job.progress.done == job.progress.total == len(local.matrices) == len(job.items())
    far = ComparisonResult(base=base, top_k=10, epsilons=[0.5], models=[job.result])
    near = ComparisonResult(base=base, top_k=10, epsilons=[0.5], models=[local])
    near.models[0].summary = {**local.summary, "label": tiny_llama_lora.name}  # the resolver's label
    assert_same(near, far)


def test_bad_input_found_on_a_worker_is_the_same_error(tiny_llama: Path, tmp_path: Path) -> None:
    broken = tmp_path / "nan-ft"
    broken.mkdir()
    weights = load_file(tiny_llama / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name] = weights[name].clone()
    weights[name][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(InputError) as local:
        compare(str(tiny_llama), [str(broken)], cache=None)
    with pytest.raises(InputError) as far:
        distributed.compare(str(tiny_llama), [str(broken)], address=None, cache=None)
    assert str(far.value) == str(local.value) and "NaN" in str(far.value)
    # The command line: exit 2, one plain line (planning errors never reach Ray at all).
    assert (
        main(
            ["report", str(tiny_llama), str(tmp_path / "missing"), "--out", str(tmp_path / "r.json"), "--ray", "local"]
        )
        == 2
    )


def test_an_unreachable_cluster_is_bad_input_at_once() -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on any more
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(InputError, match=f"--ray 127.0.0.1:{port}: cannot reach the Ray cluster"):
        distributed._check_reachable(f"127.0.0.1:{port}", f"127.0.0.1:{port}")
    with pytest.raises(InputError, match="expected local, auto or an address"):
        distributed._check_reachable("nonsense", "nonsense")


def test_a_worker_killed_mid_task_is_retried_and_the_run_completes(
    wide_llama: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, ft = wide_llama
    local = compare(str(base), [str(ft)], cache=None)
    monkeypatch.setattr(distributed, "MIN_TASK_COST", 1)  # small groups: several tasks
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:  # SIGKILL the first worker seen running one of our tasks
        while not stop.is_set() and not killed:
            for proc in psutil.process_iter(["pid", "cmdline"]):
                cmd = proc.info["cmdline"] or []
                if cmd and cmd[0] == "ray::run_task":
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed.append(proc.info["pid"])
                    return
            time.sleep(0.002)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    stats = distributed.RayRunStats()
    try:
        far = distributed.compare(str(base), [str(ft)], address=None, cache=None, stats=stats)
    finally:
        stop.set()
        thread.join()
    assert killed, "no worker was caught running a task"
    assert stats.finished == stats.tasks >= 2 and stats.cancelled == 0
    assert_same(local, far)


def test_cancel_stops_outstanding_tasks_and_keeps_finished_results(
    wide_llama: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, ft = wide_llama
    local = {m.name: m for m in compare(str(base), [str(ft)], cache=None).models[0].matrices}
    monkeypatch.setattr(distributed, "MIN_TASK_COST", 1)
    plans = plan_models(str(base), [str(ft)])
    got: list[MatrixResult] = []
    stats = distributed.RayRunStats()
    with pytest.raises(AnalysisCancelled, match="cancelled after"):
        distributed.analyse_plans(
            plans,
            [distributed.PlanRequest(str(base), str(ft))],
            cache=None,
            on_result=lambda _, result: got.append(result),
            should_stop=lambda: len(got) >= 1,
            stats=stats,
        )
    assert 1 <= len(got) < len(local) and stats.cancelled >= 1
    assert stats.finished + stats.cancelled == stats.tasks
    for result in got:
        assert_same_matrix(local[result.name], result)


def test_local_runs_never_import_ray() -> None:
    """``./run.sh`` and local runs never import Ray (it is imported only when asked for)."""
    import subprocess
    import sys

    code = "import sys, analysis.pipeline, hosting.jobs, cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_tasks_hold_every_fine_tune_of_a_base_matrix(
    tiny_llama: Path, tiny_llama_full_ft: Path, tiny_llama_lora: Path
) -> None:
    """A base matrix and its pairs in every fine-tune share one task (so its decomposition is
    computed once and read from the cache by the other pairs); large ones alone, small grouped."""
    plans = plan_models(str(tiny_llama), [str(tiny_llama_full_ft), str(tiny_llama_lora)])
    pairs = [(m, i) for m, plan in enumerate(plans) for i in range(len(plan.matrices))]
    for slots in (1, 2, 64):
        tasks = distributed.split(plans, slots)
        assert sorted(p for t in tasks for p in t.pairs) == sorted(pairs)  # each pair exactly once
        owner = {plans[m].matrices[i].name: t for t in tasks for m, i in t.pairs}
        for t in tasks:
            assert all(owner[plans[m].matrices[i].name] is t for m, i in t.pairs)
    assert len(distributed.split(plans, 1)) == 1  # tiny matrices: one group
    big = distributed.MIN_TASK_COST
    try:
        distributed.MIN_TASK_COST = 1
        assert len(distributed.split(plans, 64)) == len(plans[0].matrices)  # one per base matrix
    finally:
        distributed.MIN_TASK_COST = big


def test_command_line_report_on_ray_equals_the_local_report(
    tiny_llama: Path, tiny_llama_full_ft: Path, tiny_llama_lora: Path, tmp_path: Path
) -> None:
    import json

    args = ["report", str(tiny_llama), str(tiny_llama_full_ft), str(tiny_llama_lora), "--no-cache", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "local.json")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray.json"), "--ray", "local"]) == 0
    local, far = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "ray"))
    assert far == local


def test_fused_expert_slices_are_each_their_own_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fused ``[E, out, in]`` expert tensor gives E matrices under one tensor name: every one
    travels to a worker and comes back as itself (by identity, not by name), equal to the
    local engine field by field, for a full fine-tune and an all-linear adapter together."""
    import copy

    from tests import families

    families.quiet()
    model = families.build("qwen3_moe_fused")
    base = families.save(model, "qwen3_moe_fused", tmp_path / "base")
    tuned = copy.deepcopy(model)
    families.perturb(tuned)
    full = families.save(tuned, "qwen3_moe_fused", tmp_path / "full")
    adapter, _, _ = families.make_adapter(model, "qwen3_moe_fused", "all", tmp_path / "all")
    specs = [str(full), str(adapter)]
    local = compare(str(base), specs, cache=None)
    fused = [m for m in local.models[0].matrices if m.expert is not None]
    assert len({m.name for m in fused}) < len(fused)  # many matrices share a tensor name
    monkeypatch.setattr(distributed, "MIN_TASK_COST", 1)  # small groups: several tasks
    plans = plan_models(str(base), specs)
    assert len(distributed.split(plans, 2)) > 1  # several tasks: matrices really travel
    far = distributed.compare(str(base), specs, address=None, cache=None)
    assert_same(local, far)
    for lm, fm in zip(local.models, far.models, strict=True):
        assert [m.identity for m in lm.matrices] == [m.identity for m in fm.matrices]
        assert len({m.identity for m in fm.matrices}) == len(fm.matrices)


def test_a_quantised_base_on_ray_equals_the_local_engine(
    tiny_llama: Path, tiny_llama_full_ft: Path, tmp_path: Path
) -> None:
    """An FP8 block-scaled base (issue 22): the workers dequantise as the local engine does."""
    from tests import quantised

    base = quantised.fp8_blocks(tiny_llama, tmp_path / "fp8-base", block=16)
    local = compare(str(base), [str(tiny_llama_full_ft)], cache=None)
    far = distributed.compare(str(base), [str(tiny_llama_full_ft)], address=None, cache=SpectrumCache(tmp_path / "s"))
    assert_same(local, far)
    assert {m.id.storage for m in far.models[0].matrices} == {"fp8 e4m3, 16x16 blocks"}
