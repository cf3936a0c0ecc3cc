"""Scheduling around the decompositions: cache writes off the critical path (issue 13)."""

from __future__ import annotations

import threading

import pytest
import torch

from analysis.cache import SpectrumCache
from analysis.pipeline import analyse_plan
from analysis.plan import ComparisonPlan, MatrixPlan, TunedMatrix


def _plan(count: int = 3) -> ComparisonPlan:
    matrices = []
    for i in range(count):
        g = torch.Generator().manual_seed(70 + i)
        base = torch.randn(48, 32, generator=g)
        tuned = TunedMatrix(base + 0.1 * torch.randn(48, 32, generator=g))
        matrices.append(MatrixPlan(f"m{i}", i, "q", (48, 32), lambda b=base: b.clone(), lambda t=tuned: t))
    return ComparisonPlan("b", "t", "full", matrices)


def test_base_entries_are_written_by_the_writer_thread_before_the_analysis_ends(tmp_path, monkeypatch):
    cache = SpectrumCache(tmp_path)
    writers: list[str] = []
    real = cache.store

    def store(kind, key, tensors, info=None):
        if kind == "base":
            writers.append(threading.current_thread().name)
        real(kind, key, tensors, info)

    monkeypatch.setattr(cache, "store", store)
    results = list(analyse_plan(_plan(), device="cpu", cache=cache, workers=1))
    assert len(results) == 3
    assert len(writers) == 3 and all(name.startswith("wse-writer") for name in writers)
    assert cache.stats.computed == {"base": 3, "pair": 3}  # every write done when it returned
    again = SpectrumCache(tmp_path)
    list(analyse_plan(_plan(), device="cpu", cache=again))
    assert again.stats.computed == {} and again.stats.hits == 3


def test_a_failed_background_write_is_raised_when_the_analysis_ends(tmp_path, monkeypatch):
    cache = SpectrumCache(tmp_path)
    real = cache.store

    def store(kind, key, tensors, info=None):
        if kind == "base":
            raise OSError(28, "No space left on device")
        real(kind, key, tensors, info)

    monkeypatch.setattr(cache, "store", store)
    with pytest.raises(OSError, match="No space left"):
        list(analyse_plan(_plan(), device="cpu", cache=cache))


def test_blas_threads_are_limited_in_every_analysis_of_a_process(monkeypatch):
    """Matrices side by side run one BLAS thread each, in the second analysis of a process
    too (a limit set from a worker thread and restored from another was once ignored by
    OpenBLAS the next time: that analysis ran 5x the CPU time)."""
    import os
    import subprocess
    import sys

    if os.environ.get("WSE_FRESH_PROCESS") != "1":
        # "A process" means a fresh one: earlier tests of a pytest worker leave torch's and
        # the BLAS libraries' thread settings (and analyses of their own) in that process.
        test = f"{__file__}::test_blas_threads_are_limited_in_every_analysis_of_a_process"
        run = subprocess.run(
            [sys.executable, "-m", "pytest", test, "-q", "-n", "0", "-p", "no:cacheprovider"],
            env={**os.environ, "WSE_FRESH_PROCESS": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
        return

    from threadpoolctl import ThreadpoolController

    from analysis import pipeline

    seen: list[list[int]] = []
    real = pipeline._compute

    def compute(*args):
        blas = [i["num_threads"] for i in ThreadpoolController().info() if i["user_api"] == "blas"]
        seen.append(blas)
        return real(*args)

    monkeypatch.setattr(pipeline, "_compute", compute)
    for _ in range(3):
        list(analyse_plan(_plan(4), device="cpu", workers=2))
    assert len(seen) == 12 and all(blas and set(blas) == {1} for blas in seen), seen
