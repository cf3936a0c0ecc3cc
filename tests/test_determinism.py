"""Results are bit-identical however the work is split across threads (issue 11, item 5).

LAPACK's results depend on its thread count in the last bits (a QR of a LoRA factor on
one thread and on two differ by up to 2e-7), and a fresh worker thread used to run its
first QR on as many threads as cores. Every matrix is now computed with a thread count
that depends on its shape alone (:func:`analysis.scheduler.matrix_threads`).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from analysis import scheduler
from analysis.cache import SpectrumCache
from analysis.identity import MatrixId
from analysis.pipeline import analyse_matrix, analyse_plan, model_result
from analysis.plan import ComparisonPlan, LowRankDelta, MatrixPlan, TunedMatrix
from analysis.report import to_report
from analysis.results import ComparisonResult


def _adapter_pairs(count: int, m: int = 384, n: int = 1536, r: int = 64) -> list[MatrixPlan]:
    """The demo's shapes and its largest adapter rank (where the QR of B and A^T is largest)."""
    plans = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        base = torch.randn(m, n, generator=g) / n**0.5
        delta = LowRankDelta(torch.randn(m, r, generator=g) * 0.05, torch.randn(r, n, generator=g) * 0.05, 2.0)
        tuned = TunedMatrix(base + delta.dense(), delta)
        plans.append(
            MatrixPlan(
                MatrixId(f"layer.{i}.w", i, "mlp_in", (m, n)),
                lambda b=base: b.clone(),
                lambda t=tuned: t,
                adapter_rank=r,
            )
        )
    return plans


def _entries(cache: SpectrumCache) -> dict[str, tuple[dict[str, bytes], dict[str, str]]]:
    """Each entry's tensors (as bytes) and metadata. Not the file's bytes: safetensors
    writes the metadata's keys in a hash map's order, which varies from run to run."""
    found = {}
    for path in cache.entries():
        if "pair" in path.parts or "base" in path.parts:
            with safe_open(path, framework="pt") as f:
                tensors = {name: f.get_tensor(name).view(-1).view(torch.uint8).numpy().tobytes() for name in f.keys()}
                found[path.name] = tensors, f.metadata()
    return found


def test_a_pair_recomputed_alone_has_the_bytes_of_a_full_run(tmp_path):
    matrices = _adapter_pairs(4)
    full = SpectrumCache(tmp_path / "full")
    list(analyse_plan(ComparisonPlan("b", "t", "adapter", matrices), device="cpu", cache=full, workers=2))
    written = _entries(full)
    assert len(written) == 8  # a base and a pair entry per matrix
    for matrix in (matrices[0], matrices[3]):  # a worker's first matrix, and a later one
        alone = SpectrumCache(tmp_path / f"alone-{matrix.layer}")
        analyse_matrix(matrix, device="cpu", cache=alone)
        recomputed = _entries(alone)
        assert len(recomputed) == 2
        for name, data in recomputed.items():
            assert data == written[name], f"{name} differs from the full run's entry"


def _report(matrices: list[MatrixPlan], **kwargs) -> str:
    plan = ComparisonPlan("base", "adapter", "adapter", matrices)
    result = ComparisonResult(base="base", top_k=10, epsilons=[0.1, 0.5, 0.9])
    result.models.append(model_result(plan, list(analyse_plan(plan, device="cpu", **kwargs))))
    return json.dumps(to_report(result), sort_keys=True)


def test_report_bytes_do_not_depend_on_the_number_of_workers(monkeypatch):
    matrices = _adapter_pairs(3)
    one = _report(matrices, workers=1)
    two = _report(matrices, workers=2)
    monkeypatch.setattr(scheduler, "available_cores", lambda: 4)  # as on a larger machine
    four = _report(matrices, workers=4)
    assert one == two == four


def test_threads_per_matrix_depend_on_its_shape_alone(monkeypatch):
    monkeypatch.setattr(scheduler, "available_cores", lambda: 2)
    monkeypatch.setattr(scheduler, "_caller_threads", lambda: 2)
    assert scheduler.matrix_threads((384, 1536), "gram") == (1, 1)  # side by side, one thread each
    assert scheduler.matrix_threads((4096, 11008), "gram") == (2, 2)  # alone on every core
    assert scheduler.matrix_threads((1024, 1024), "gram", budget=10**6) == (2, 1)  # fills the budget: alone


def _dense_pairs(count: int, size: int = 256) -> list[MatrixPlan]:
    """A tiny full fine-tune: ``count`` square dense updates.

    256 is about the smallest order whose tridiagonal reduction (SciPy's OpenBLAS ``dsytrd``)
    gives other bits on two BLAS threads than on one (224 does, 192 not, on the 2-core test
    machine).
    """
    plans = []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        base = torch.randn(size, size, generator=g) / size**0.5
        tuned = TunedMatrix(base + 0.01 * torch.randn(size, size, generator=g) / size**0.5)
        plans.append(
            MatrixPlan(
                MatrixId(f"layer.{i}.w", i, "attn_out", (size, size)), lambda b=base: b.clone(), lambda t=tuned: t
            )
        )
    return plans


def _overlap_first_two(monkeypatch: pytest.MonkeyPatch):
    """Make the two workers' first matrices overlap as they did on the busy demo run.

    ``layer.1`` starts computing first; ``layer.0`` starts while it computes, and does its
    reductions only after ``layer.1`` is done. (Left to chance, this happened to 1 to 5 of
    the demo full fine-tune's 36 matrices a run on 2 cores, and rarely to tiny ones.)
    """
    from analysis import pipeline

    second_in, first_in, second_out = threading.Event(), threading.Event(), threading.Event()
    spectra, result = pipeline._group_spectra, pipeline.matrix_result

    def group_spectra(pairs, *args):
        name = pairs[0].plan.name
        if name == "layer.0.w":
            first_in.set()
            assert second_out.wait(30)
            time.sleep(0.05)  # layer.1 leaves its thread settings
        elif name == "layer.1.w":
            second_in.set()
            assert first_in.wait(30)
        return spectra(pairs, *args)

    def matrix_result(plan, *args):
        if plan.name == "layer.1.w":
            second_out.set()
        return result(plan, *args)

    def load_tuned(real):
        def load():
            assert second_in.wait(30)  # layer.0 is read once layer.1 computes
            return real()

        return load

    monkeypatch.setattr(pipeline, "_group_spectra", group_spectra)
    monkeypatch.setattr(pipeline, "matrix_result", matrix_result)
    return load_tuned


def test_a_full_fine_tune_gives_the_same_bytes_run_after_run(tmp_path, monkeypatch):
    """Three runs without a cache write one report, three fresh caches the same entries,
    and they are what one worker gives.

    Matrices analysed side by side each run one BLAS thread; but OpenBLAS's
    ``openblas_set_num_threads_local`` sets the count of the whole process in the pthreads
    builds NumPy and SciPy ship, so a worker putting back the count it found (the caller's
    two) when its matrix was done changed the count under the other worker's reduction:
    three runs of the demo's full fine-tune wrote three reports (3 to 5 of 36 matrices
    differing in the last bits of their update's values).
    """
    if scheduler.available_cores() < 2:
        pytest.skip("one core: every BLAS call runs on one thread anyway")
    from threadpoolctl import ThreadpoolController, threadpool_limits

    from analysis import lapack

    libraries = ThreadpoolController().select(user_api="blas").lib_controllers
    counts: set[tuple[int, ...]] = set()  # BLAS thread counts seen around each reduction

    class Counted(lapack.Tridiagonal):
        def __init__(self, gram) -> None:
            counts.add(tuple(lib.get_num_threads() for lib in libraries))
            super().__init__(gram)
            counts.add(tuple(lib.get_num_threads() for lib in libraries))

    monkeypatch.setattr(lapack, "Tridiagonal", Counted)
    matrices = _dense_pairs(2)
    cores = scheduler.available_cores()  # a fresh process's BLAS thread count, set before each run
    with threadpool_limits(limits=cores, user_api="blas"):
        alone = _report(matrices, workers=1)
    reports, caches = set(), []
    for run in range(6):
        with monkeypatch.context() as m, threadpool_limits(limits=cores, user_api="blas"):
            load = _overlap_first_two(m)
            forced = [replace(matrices[0], load_tuned=load(matrices[0].load_tuned)), *matrices[1:]]
            if run < 3:
                reports.add(_report(forced, workers=2))
            else:
                cache = SpectrumCache(tmp_path / f"cache-{run}")
                list(analyse_plan(ComparisonPlan("base", "full", "full", forced), device="cpu", cache=cache, workers=2))
                caches.append(_entries(cache))
    assert counts == {(1,) * len(libraries)}, f"BLAS thread counts seen around a reduction: {counts}"
    assert reports == {alone}, "runs wrote different reports"
    assert len(caches[0]) == 4  # a base and a pair entry per matrix
    for other in caches[1:]:
        differ = sorted(name for name in caches[0] if caches[0][name] != other.get(name))
        assert not differ, f"{len(differ)} of {len(caches[0])} entries differ between fresh caches"
