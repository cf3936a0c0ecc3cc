"""Scheduling around the decompositions: cache writes off the critical path (issue 13)."""

from __future__ import annotations

import threading

import pytest
import torch

from analysis.cache import SpectrumCache
from analysis.identity import MatrixId
from analysis.pipeline import analyse_plan
from analysis.plan import ComparisonPlan, MatrixPlan, TunedMatrix


def _plan(count: int = 3) -> ComparisonPlan:
    matrices = []
    for i in range(count):
        g = torch.Generator().manual_seed(70 + i)
        base = torch.randn(48, 32, generator=g)
        tuned = TunedMatrix(base + 0.1 * torch.randn(48, 32, generator=g))
        matrices.append(MatrixPlan(MatrixId(f"m{i}", i, "q", (48, 32)), lambda b=base: b.clone(), lambda t=tuned: t))
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
    assert cache.stats.computed == {
        "base": 3,
        "pair": 3,
        "base-top": 3,
        "measures": 3,
    }  # every write done when it returned
    again = SpectrumCache(tmp_path)
    list(analyse_plan(_plan(), device="cpu", cache=again))
    assert again.stats.computed == {} and again.stats.hits == 6


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
    too (a process-wide limit set through threadpoolctl from a worker thread and restored
    from another was once ignored the next time: threadpoolctl sets OpenBLAS's count only
    from the first thread that used it while that one lives, and that analysis ran 5x the
    CPU time; the count is now set by OpenBLAS's own setter from each computing thread)."""
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

    from analysis import pipeline, scheduler

    setters = scheduler._blas_libraries()
    assert len(setters) == 2  # NumPy's and SciPy's OpenBLAS, each with a per-thread count
    local = threading.local()

    def spy(setter):
        def set_local(threads: int) -> int:
            local.threads = threads
            return setter(threads)

        return set_local

    monkeypatch.setattr(scheduler, "_blas_local", [spy(setter) for setter in setters])
    seen: list[int | None] = []
    real = pipeline._group_spectra  # one pair per group with the CPU's gram method

    def group_spectra(*args):
        seen.append(getattr(local, "threads", None))
        return real(*args)

    monkeypatch.setattr(pipeline, "_group_spectra", group_spectra)
    for _ in range(3):
        list(analyse_plan(_plan(4), device="cpu", workers=2))
    assert seen == [1] * 12, seen


def test_overlapping_analyses_give_the_bytes_they_give_alone(monkeypatch):
    """The BLAS libraries outside torch (SciPy's LAPACK) give different last bits on one
    thread and on two, and a thread count set for the whole process would be shared by
    every analysis in it (two visitors' jobs in one dashboard). A large matrix computing on
    two BLAS threads while another analysis computes small ones on one: both give the
    bytes they give alone."""
    from analysis import lapack, pipeline, scheduler

    monkeypatch.setattr(lapack, "THREADED_MIN_ORDER", 64)  # 320 x 288 runs on 2 threads, 24 x 16 on 1
    monkeypatch.setattr(scheduler, "available_cores", lambda: 2)

    def plan(name: str, shape: tuple[int, int], count: int) -> ComparisonPlan:
        matrices = []
        for i in range(count):
            g = torch.Generator().manual_seed(90 + i)
            base = torch.randn(*shape, generator=g, dtype=torch.float64).float()
            tuned = TunedMatrix(base + 0.1 * torch.randn(*shape, generator=g))
            matrices.append(
                MatrixPlan(MatrixId(f"{name}{i}", i, "q", shape), lambda b=base: b.clone(), lambda t=tuned: t)
            )
        return ComparisonPlan("b", name, "full", matrices)

    def fields(results) -> list[bytes]:
        return [
            b"".join(a.tobytes() for a in (r.tuned_singular_values, r.delta_singular_values, r.intruder_scores))
            for r in results
        ]

    small, large = plan("small", (24, 16), 4), plan("large", (320, 288), 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        small_alone = fields(analyse_plan(small, device="cpu", workers=2))
        large_alone = fields(analyse_plan(large, device="cpu"))
        with monkeypatch.context() as m:  # the same large matrix on one BLAS thread
            m.setattr(pipeline, "matrix_threads", lambda shape, method, budget=0: (2, 1))
            assert fields(analyse_plan(large, device="cpu")) != large_alone  # else this test proves nothing

        inside, release = threading.Event(), threading.Event()
        order: list[str] = []
        real = pipeline._group_spectra  # one pair per group with the CPU's gram method

        def group_spectra(pairs, *args):
            (pair,) = pairs
            order.append(pair.plan.name)
            if pair.plan.name == "large0":
                inside.set()
                release.wait(5.0)  # the small analysis starts meanwhile, and waits
            return real(pairs, *args)

        monkeypatch.setattr(pipeline, "_group_spectra", group_spectra)
        large_beside: list[bytes] = []
        thread = threading.Thread(target=lambda: large_beside.extend(fields(analyse_plan(large, device="cpu"))))
        thread.start()
        assert inside.wait(30)
        timer = threading.Timer(0.3, release.set)
        timer.start()
        small_beside = fields(analyse_plan(small, device="cpu", workers=2))
        thread.join(30)
        timer.join()
    finally:
        torch.set_num_threads(before)
    assert order[0] == "large0" and sorted(order[1:]) == [f"small{i}" for i in range(4)]
    assert small_beside == small_alone
    assert large_beside == large_alone


def test_a_multi_threaded_blas_call_is_never_disturbed_by_one_thread_calls_beside_it():
    """OpenBLAS runs a multi-threaded call on fewer threads when another thread is inside
    OpenBLAS (without the gate, 5 of 60 repetitions below gave the two-thread bits): a
    matrix on two BLAS threads waits until no one-thread matrix computes, and gives the same
    bytes every time while other threads keep computing small ones."""
    from analysis import scheduler
    from analysis.linalg import decompose

    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(5)
    large, small = torch.randn(320, 288, generator=g), torch.randn(96, 80, generator=g)

    def values() -> bytes:
        return decompose(large, cpu, "gram", top=20, vectors=torch.float32).values.numpy().tobytes()

    with scheduler.blas_threads(2):
        alone = values()
    with scheduler.blas_threads(1):
        assert values() != alone  # one and two threads differ: else this test proves nothing
    stop = threading.Event()

    def beside() -> None:
        while not stop.is_set():
            with scheduler.blas_threads(1):
                decompose(small, cpu, "gram", top=10, vectors=torch.float32)

    threads = [threading.Thread(target=beside) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        runs = []
        for _ in range(60):
            with scheduler.blas_threads(2):
                runs.append(values())
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert runs == [alone] * 60


def _blas_counts() -> list[int]:
    """The thread count of every BLAS library outside torch (one count per process each)."""
    from threadpoolctl import ThreadpoolController

    return [c.get_num_threads() for c in ThreadpoolController().select(user_api="blas").lib_controllers]


def test_a_matrix_keeps_one_blas_thread_when_the_matrix_beside_it_is_done():
    """OpenBLAS's ``openblas_set_num_threads_local`` sets the count of the whole process in
    the pthreads builds NumPy and SciPy ship: a matrix that put back the count it found
    when it was done (two, the caller's) changed the count of the matrix still computing
    beside it, whose reduction then ran on two threads and gave other last bits (three
    runs of the demo's full fine-tune, three reports). The count is one while any
    one-thread matrix computes, and the caller's again when none does."""
    from threadpoolctl import threadpool_limits

    from analysis import scheduler

    with threadpool_limits(limits=2, user_api="blas"):
        caller = _blas_counts()
        first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
        seen: list[list[int]] = []

        def first() -> None:
            with scheduler.blas_threads(1):
                first_in.set()
                assert second_in.wait(10)
            first_out.set()

        def second() -> None:
            assert first_in.wait(10)
            with scheduler.blas_threads(1):
                second_in.set()
                assert first_out.wait(10)
                seen.append(_blas_counts())  # the first matrix is done; this one computes on

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert seen == [[1] * len(caller)]
        assert _blas_counts() == caller  # put back once no matrix computes
