"""The engine's fast paths against slow float64 references (no timings: see benchmarks/).

Every shortcut the pipeline takes -- the Gram eigendecomposition instead of an SVD, vectors
derived for one side only, float32 vectors for the update, float16 base vectors in the
cache, the fingerprint index instead of hashing, worker threads -- must give what the
definitions give, to the tolerances the benchmark's guard uses: intruder counts equal at
every eps of the grid except where a score lies within 1e-3 of eps, top singular values
within 1e-4 relative.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

from analysis import cache as cache_module
from analysis import linalg, metrics
from analysis.cache import SpectrumCache, tensor_digest
from analysis.errors import InputError
from analysis.identity import MatrixId
from analysis.linalg import NULL_SPACE_RELATIVE, decompose, default_method, low_rank_spectrum, top_eigenvectors
from analysis.pairs import stored_base_spectrum
from analysis.pipeline import analyse_matrix, analyse_plan
from analysis.plan import ComparisonPlan, LowRankDelta, MatrixPlan, TunedMatrix
from analysis.results import DEFAULT_EPSILONS
from analysis.scheduler import in_order

CPU = torch.device("cpu")
MARGIN = 1e-3


def spectrum_matrix(m: int, n: int, values: np.ndarray, seed: int) -> torch.Tensor:
    """``U diag(values) V^T`` with random orthonormal ``U``, ``V``: a known spectrum."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return (U * torch.as_tensor(values, dtype=torch.float64)) @ V.T


def trained_like(m: int, n: int, seed: int) -> torch.Tensor:
    """Power-law spikes plus a Gaussian bulk, like benchmarks/workloads.py (float32)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n) // 4
    s = 30 * torch.arange(1, k + 1, dtype=torch.float64) ** -0.6
    spikes = (torch.randn(m, k, generator=g, dtype=torch.float64) * s / m**0.5) @ (
        torch.randn(n, k, generator=g, dtype=torch.float64).T / n**0.5
    )
    return (spikes + torch.randn(m, n, generator=g, dtype=torch.float64) * 2 / (m**0.5 + n**0.5)).float()


def reference(w: torch.Tensor):
    u, s, vt = np.linalg.svd(w.double().numpy(), full_matrices=False)
    return u, s, vt.T


def assert_same_vectors(actual: torch.Tensor, expected: np.ndarray, tol: float) -> None:
    """Column by column equal up to sign (singular vectors are defined up to sign)."""
    cosines = np.abs(np.sum(actual.double().numpy() * expected, axis=0))
    assert cosines.min() > 1 - tol, f"worst |cos| {cosines.min()}"


SHAPES = [(96, 96), (160, 48), (48, 160)]


@pytest.mark.parametrize("shape", SHAPES, ids=["square", "tall", "wide"])
def test_gram_decomposition_matches_float64_svd(shape):
    m, n = shape
    values = np.geomspace(10.0, 1e-3, min(m, n))  # condition number 1e4, well separated
    w = spectrum_matrix(m, n, values, seed=1).float()
    u, s, v = reference(w)
    spectrum = decompose(w, CPU, "gram")
    np.testing.assert_allclose(spectrum.values.numpy(), s, rtol=1e-9, atol=1e-9 * s[0])
    assert_same_vectors(spectrum.left(), u, 1e-8)  # every vector, derived ones included
    assert_same_vectors(spectrum.right(), v, 1e-8)
    assert_same_vectors(spectrum.left(7), u[:, :7], 1e-10)
    top = spectrum.left(10).double()
    torch.testing.assert_close(top.T @ top, torch.eye(10, dtype=torch.float64), atol=1e-6, rtol=0)


def test_gram_is_more_accurate_than_the_float32_svd_the_papers_use():
    """Squaring the condition number costs nothing in float64 (module docs of linalg)."""
    w = trained_like(200, 120, seed=2)
    _, s, _ = reference(w)
    gram = decompose(w, CPU, "gram").values.numpy()
    svd32 = decompose(w, CPU, "svd").values.double().numpy()
    assert np.max(np.abs(gram - s)) <= np.max(np.abs(svd32 - s))
    assert np.max(np.abs(gram - s) / s) < 1e-9


def test_rank_deficient_matrix_gets_an_orthonormal_completion():
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(80, 3, generator=g) @ torch.randn(3, 50, generator=g)).float()  # tall, rank 3
    spectrum = decompose(w, CPU, "gram")
    _, s, _ = reference(w)
    np.testing.assert_allclose(spectrum.values.numpy()[:3], s[:3], rtol=1e-7)
    assert spectrum.values[3:].max() < NULL_SPACE_RELATIVE * spectrum.values[0]
    U = spectrum.left().double()  # 3 derived columns + 47 completing the null space
    torch.testing.assert_close(U.T @ U, torch.eye(50, dtype=torch.float64), atol=1e-8, rtol=0)
    assert bool(torch.isfinite(U).all())


def test_zero_matrix():
    spectrum = decompose(torch.zeros(20, 30), CPU, "gram")
    assert spectrum.values.abs().max() == 0
    V = spectrum.right(5).double()
    torch.testing.assert_close(V.T @ V, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)


def test_float32_vectors_keep_float64_values_and_the_top_span():
    w = trained_like(120, 200, seed=4)
    u, s, v = reference(w)
    fast = decompose(w, CPU, "gram", vectors=torch.float32)
    np.testing.assert_allclose(fast.values.numpy(), s, rtol=1e-9, atol=1e-12 * s[0])
    assert_same_vectors(fast.left(10), u[:, :10], 1e-6)
    assert_same_vectors(fast.right(10), v[:, :10], 1e-6)


def test_amplification_and_scores_from_the_fast_spectrum():
    base = trained_like(128, 96, seed=5)
    tuned = base + 0.05 * trained_like(128, 96, seed=6)
    u0, _, _ = reference(base)
    ut, _, _ = reference(tuned)
    ud, sd, vd = reference(tuned - base)
    scores_ref = np.abs(ut[:, :40].T @ u0).max(axis=1)

    base_spectrum = stored_base_spectrum(decompose(base, CPU, "gram"))
    assert base_spectrum.left().dtype == torch.float16  # 2 bytes per cached element
    scores, _ = metrics.intruder_scores(decompose(tuned, CPU, "gram").left(40).float(), base_spectrum.left().float())
    assert np.max(np.abs(scores - scores_ref)) < 2**-11

    delta = decompose((tuned - base).double(), CPU, "gram", vectors=torch.float32)
    r = metrics.rank90(delta.values)
    expected = np.linalg.norm(sd) / np.linalg.norm(ud[:, :r].T @ base.double().numpy() @ vd[:, :r])
    got = metrics.amplification_factor(metrics.frobenius_norm(delta.values), delta.left(r), delta.right(r), base)
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)], ids=["tall", "wide"])
def test_top_vectors_by_subspace_iteration_match_float64(monkeypatch, shape):
    monkeypatch.setattr(linalg, "SUBSPACE_MIN_SIZE", 64)  # production: from 3072 on
    monkeypatch.setattr(linalg.lapack, "available", lambda: False)  # the path taken without SciPy's LAPACK
    base = trained_like(*shape, seed=8)
    tuned = base + 0.02 * trained_like(*shape, seed=9)
    u, s, v = reference(tuned)
    seeds = decompose(base, CPU, "gram").left(40)
    wide = shape[0] <= shape[1]
    for start in (seeds, lambda: seeds, None):  # the vectors, a function making them, none
        spectrum = decompose(tuned, CPU, "gram", top=20, seeds=start)
        known = spectrum._left if wide else spectrum._right
        assert known is not None and known.shape[1] == 20  # only what was asked for was computed
        np.testing.assert_allclose(spectrum.values.numpy(), s, rtol=1e-9, atol=1e-12 * s[0])
        # the Gram side to the iteration's tolerance, the other side derived in float32
        assert_same_vectors(spectrum.left(20), u[:, :20], 1e-9 if wide else 1e-6)
        assert_same_vectors(spectrum.right(20), v[:, :20], 1e-6 if wide else 1e-9)
        with pytest.raises(ValueError, match="only the top 20"):
            (spectrum.left if wide else spectrum.right)(21)


def test_subspace_iteration_gives_up_on_equal_top_eigenvalues():
    values = np.concatenate([[5.0, 5.0], np.geomspace(3.0, 0.01, 98)])
    w = spectrum_matrix(100, 100, values, seed=10)
    gram = w @ w.T
    eigenvalues = torch.linalg.eigvalsh(gram).flip(0)
    assert top_eigenvectors(gram, eigenvalues, 5, max_iterations=40) is None  # no unique top vectors
    w2 = spectrum_matrix(100, 100, np.geomspace(5.0, 0.01, 100), seed=10)
    gram2 = w2 @ w2.T
    found = top_eigenvectors(gram2, torch.linalg.eigvalsh(gram2).flip(0), 5)
    u, _, _ = reference(w2)
    assert found is not None
    assert_same_vectors(found, u[:, :5], 1e-10)


def test_low_rank_spectrum_matches_dense_reference():
    g = torch.Generator().manual_seed(7)
    delta = LowRankDelta(torch.randn(90, 6, generator=g), torch.randn(6, 70, generator=g), scale=0.7)
    u, s, v = reference(delta.dense())
    spectrum = low_rank_spectrum(delta, CPU)
    np.testing.assert_allclose(spectrum.values.numpy(), s[:6], rtol=1e-5)
    assert_same_vectors(spectrum.left(), u[:, :6], 1e-5)
    assert_same_vectors(spectrum.right(), v[:, :6], 1e-5)


# -- the pipeline end to end -----------------------------------------------------------


def plan_of(name: str, base: torch.Tensor, tuned: TunedMatrix, loads: list | None = None, **kwargs) -> MatrixPlan:
    def load_base():
        if loads is not None:
            loads.append(("base", name))
        return base.clone()

    def load_tuned():
        if loads is not None:
            loads.append(("tuned", name))
        return tuned

    return MatrixPlan(MatrixId(name, 0, name, tuple(base.shape)), load_base, load_tuned, **kwargs)


def planted_pair(seed: int, m: int = 96, n: int = 64):
    """A base and a LoRA-like fine-tune with two planted intruder dimensions."""
    base = trained_like(m, n, seed)
    g = torch.Generator().manual_seed(seed + 100)
    s1 = float(torch.linalg.matrix_norm(base.double(), ord=2))
    delta = LowRankDelta(torch.randn(m, 2, generator=g) * s1 / m**0.5, torch.randn(2, n, generator=g) / n**0.5, 1.0)
    return base, TunedMatrix(base + delta.dense(), delta)


def test_pipeline_intruder_counts_equal_float64_on_the_grid(tmp_path):
    """The benchmark's guard, as a unit test: counts and top values against float64."""
    for seed in range(3):
        base, tuned = planted_pair(seed)
        result = analyse_matrix(plan_of("m", base, tuned, adapter_rank=2), device="cpu", cache=SpectrumCache(tmp_path))
        u0, s0, _ = reference(base)
        ut, st, _ = reference(tuned.weight)
        expected = np.abs(ut[:, :10].T @ u0).max(axis=1)
        assert np.sum(expected < 0.5) >= 1  # the planted directions are intruders
        for eps in DEFAULT_EPSILONS:
            if np.all(np.abs(expected - eps) > MARGIN):
                assert result.intruder_counts(10, [eps]) == [int(np.sum(expected < eps))]
        np.testing.assert_allclose(result.tuned_singular_values[:10], st[:10], rtol=1e-4)
        np.testing.assert_allclose(result.base_singular_values[:10], s0[:10], rtol=1e-4)


def test_result_does_not_depend_on_where_the_base_came_from(tmp_path):
    base, tuned = planted_pair(11)
    fresh = analyse_matrix(plan_of("m", base, tuned, adapter_rank=2), device="cpu", cache=None)
    cache = SpectrumCache(tmp_path)
    other = TunedMatrix(base + 0.01 * trained_like(96, 64, 12))
    analyse_matrix(plan_of("m", base, other), device="cpu", cache=cache)  # caches the base spectrum
    reused = analyse_matrix(plan_of("m", base, tuned, adapter_rank=2), device="cpu", cache=cache)
    assert cache.stats.computed == {"base": 1, "pair": 2, "base-top": 1, "measures": 2}
    np.testing.assert_array_equal(fresh.intruder_scores, reused.intruder_scores)
    np.testing.assert_array_equal(fresh.similarity, reused.similarity)


def test_plan_digests_find_cached_results_without_loading_weights(tmp_path):
    base, tuned = planted_pair(13)
    stored = {"base": base, "tuned": tuned.weight}
    for key, tensor in stored.items():
        (tmp_path / f"{key}.bin").write_bytes(tensor.numpy().tobytes())

    def digests(stored_digest):
        return tuple(stored_digest(tmp_path / f"{key}.bin", key, lambda k=key: stored[k]) for key in ("base", "tuned"))

    loads: list = []
    matrix = plan_of("m", base, tuned, loads, adapter_rank=2, digests=digests)
    cache = SpectrumCache(tmp_path / "cache")
    first = analyse_matrix(matrix, device="cpu", cache=cache)
    assert loads == [("base", "m"), ("tuned", "m")] and cache.fingerprints.hashed == 2

    loads.clear()
    again = SpectrumCache(tmp_path / "cache")  # a new process: only the index on disk
    second = analyse_matrix(matrix, device="cpu", cache=again)
    assert loads == [] and again.fingerprints.hashed == 0 and again.stats.hits == 2  # pair, measures
    np.testing.assert_array_equal(first.intruder_scores, second.intruder_scores)


def test_fingerprint_index_follows_file_changes(tmp_path):
    cache = SpectrumCache(tmp_path / "cache")
    file = tmp_path / "w.bin"
    first, second = torch.arange(6.0), torch.arange(6.0) + 1
    file.write_bytes(first.numpy().tobytes())
    calls: list = []

    def load(t):
        calls.append(1)
        return t

    assert cache.fingerprints.digest(file, "w", lambda: load(first)) == tensor_digest(first)
    assert cache.fingerprints.digest(file, "w", lambda: load(first)) == tensor_digest(first)
    assert len(calls) == 1
    time.sleep(0.01)
    file.write_bytes(second.numpy().tobytes())  # same size, new content and ctime
    assert cache.fingerprints.digest(file, "w", lambda: load(second)) == tensor_digest(second)
    assert len(calls) == 2
    cache.fingerprints.flush()
    cache.fingerprints.path_for(file).write_text("{not json")  # a damaged index is ignored
    fresh = SpectrumCache(tmp_path / "cache").fingerprints
    assert fresh.digest(file, "w", lambda: load(second)) == tensor_digest(second)
    assert len(calls) == 3


def test_fingerprint_index_writes_in_batches(tmp_path, monkeypatch):
    """Digests found in quick succession are written together (an adapter's hundreds of
    tensors once, not once each), all of them by ``flush``, merged with other writers'."""
    file = tmp_path / "adapter.bin"
    file.write_bytes(b"0" * 64)
    index = SpectrumCache(tmp_path / "cache").fingerprints
    writes: list[str] = []
    real_write = cache_module.atomic_write_text
    monkeypatch.setattr(
        cache_module, "atomic_write_text", lambda path, text: writes.append(text) or real_write(path, text)
    )
    tensors = {f"t{i}": torch.full((3,), float(i)) for i in range(50)}
    for name, tensor in tensors.items():
        index.digest(file, name, lambda t=tensor: t)
    assert len(writes) == 1  # the first one; the rest wait for the interval or a flush
    other = SpectrumCache(tmp_path / "cache").fingerprints  # another process meanwhile
    other.digest(file, "elsewhere", lambda: torch.zeros(2))
    index.flush()
    assert len(writes) == 3
    on_disk = json.loads(index.path_for(file).read_text())
    assert on_disk == {**{n: tensor_digest(t) for n, t in tensors.items()}, "elsewhere": tensor_digest(torch.zeros(2))}
    index.flush()  # nothing new: nothing written
    assert len(writes) == 3


def test_workers_give_the_same_results_in_plan_order():
    pairs = [planted_pair(20 + i, m=64, n=48) for i in range(5)]
    plan = ComparisonPlan(
        "b", "t", "adapter", [plan_of(f"l.{i}", b, t, adapter_rank=2) for i, (b, t) in enumerate(pairs)]
    )
    one = list(analyse_plan(plan, device="cpu", workers=1))
    two = list(analyse_plan(plan, device="cpu", workers=2))
    assert [r.name for r in two] == [f"l.{i}" for i in range(5)]
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a.intruder_scores, b.intruder_scores)
        assert a.effective_rank == b.effective_rank


def test_lapack_threads_only_where_a_second_one_pays(monkeypatch):
    """One matrix on two cores gets two torch threads, but SciPy's BLAS stays on one below
    order 2048 (two spin against torch's OpenMP team: 5x slower at 384)."""
    from analysis import lapack, pipeline, scheduler

    asked: list[int] = []
    real, before = pipeline.blas_threads, torch.get_num_threads()
    monkeypatch.setattr(pipeline, "blas_threads", lambda threads: asked.append(threads) or real(threads))
    monkeypatch.setattr(scheduler, "available_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    base, tuned = planted_pair(30, m=64, n=48)
    try:
        list(
            analyse_plan(ComparisonPlan("b", "t", "adapter", [plan_of("m", base, tuned, adapter_rank=2)]), device="cpu")
        )
    finally:
        monkeypatch.undo()
        torch.set_num_threads(before)  # the pipeline restored the faked count
    assert asked == [1]
    assert lapack.threads_for(384, 2) == 1 and lapack.threads_for(4096, 2) == 2 and lapack.threads_for(4096, 1) == 1


def test_in_order_bounds_concurrency_by_memory_and_raises_in_order():
    running, peak, lock = [0], [0], threading.Lock()

    def run(item):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        if item == 3:
            raise ValueError("item 3")
        return item * 10

    def keep(value):
        return value

    def no_stop(done):
        return None

    got = list(in_order(list(range(3)), run, keep, 2, budget=100, cost=lambda i: 60, before_each=no_stop))
    assert [r for _, r in got] == [0, 10, 20] and peak[0] == 1  # two would exceed the budget
    peak[0] = 0
    results = in_order(list(range(6)), run, keep, 2, budget=100, cost=lambda i: 10, before_each=no_stop)
    assert [next(results)[1] for _ in range(3)] == [0, 10, 20] and peak[0] == 2
    with pytest.raises(ValueError, match="item 3"):
        next(results)


def test_single_worker_reads_the_next_matrix_while_computing():
    events: list[tuple[str, int, str]] = []

    def prepare(item):
        events.append(("prepare", item, threading.current_thread().name))
        return item

    def finish(item):
        time.sleep(0.05)  # the reader has time to prepare the next item meanwhile
        events.append(("finish", item, threading.current_thread().name))
        return item

    got = list(in_order(list(range(3)), prepare, finish, 1, 10**9, lambda i: 1, lambda done: None))
    assert [r for _, r in got] == [0, 1, 2]
    order = [(kind, item) for kind, item, _ in events]
    assert order.index(("prepare", 1)) < order.index(("finish", 0))
    assert all(name.startswith("wse-reader") for kind, _, name in events if kind == "prepare")
    assert all(name == threading.current_thread().name for kind, _, name in events if kind == "finish")
    # ...but not when two prepared matrices would not fit the memory budget together
    events.clear()
    list(in_order(list(range(3)), prepare, finish, 1, 100, lambda i: 60, lambda done: None))
    order = [(kind, item) for kind, item, _ in events]
    assert order.index(("prepare", 1)) > order.index(("finish", 0))


def test_cache_stays_within_budget_without_scanning_every_put(tmp_path):
    cache = SpectrumCache(tmp_path, budget_bytes=10**9)
    tensors = {"x": torch.zeros(1000)}
    cache.put("pair", "aa" * 32, tensors)
    size = cache.size_bytes()
    cache.budget_bytes = int(size * 3.5)
    for i in range(10):
        cache.put("pair", f"{i:02x}" * 32, tensors)
        assert cache.size_bytes() <= cache.budget_bytes
    assert cache.stats.evicted >= 7


def test_method_choice(monkeypatch):
    assert default_method(CPU) == "gram"
    monkeypatch.setenv("WSE_SVD_METHOD", "svd")
    assert default_method(CPU) == "svd"
    monkeypatch.setenv("WSE_SVD_METHOD", "magic")
    with pytest.raises(InputError, match="WSE_SVD_METHOD"):
        default_method(CPU)
    with pytest.raises(ValueError, match="CUDA"):
        decompose(torch.eye(3), CPU, "gesvda")


def test_svd_method_agrees_with_gram_in_the_pipeline(monkeypatch):
    base, tuned = planted_pair(30)
    gram = analyse_matrix(plan_of("m", base, tuned, adapter_rank=2), device="cpu")
    monkeypatch.setenv("WSE_SVD_METHOD", "svd")
    svd = analyse_matrix(plan_of("m", base, tuned, adapter_rank=2), device="cpu")
    np.testing.assert_allclose(gram.intruder_scores, svd.intruder_scores, atol=1e-3)
    np.testing.assert_allclose(gram.tuned_singular_values, svd.tuned_singular_values, rtol=1e-4, atol=1e-6)
    assert gram.rank90 == svd.rank90
    assert gram.amplification_factor == pytest.approx(svd.amplification_factor, rel=1e-4)


def test_workers_never_oversubscribe_the_cores(monkeypatch):
    from analysis import scheduler

    monkeypatch.setattr(scheduler, "available_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert scheduler.default_workers() == 1  # GPU: torch already uses both cores, a reader thread
    small, big, budget = 10**6, 3 * 10**9, 2 * 1024**3
    assert scheduler.cpu_parallelism(small, budget, 36) == (2, 1)  # small matrices: side by side
    assert scheduler.cpu_parallelism(big, budget, 36) == (1, 2)  # one that only fits alone: every core
    assert scheduler.cpu_parallelism(small, budget, 1) == (1, 2)
    assert scheduler.cpu_parallelism(small, budget, 36, workers=2) == (2, 1)
    monkeypatch.setattr(scheduler, "available_cores", lambda: 16)
    assert scheduler.cpu_parallelism(small, budget, 36) == (16, 1)
    assert scheduler.cpu_parallelism(budget // 4, budget, 36) == (4, 2)  # memory bounds the workers
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # a caller's lower setting holds
    assert scheduler.cpu_parallelism(big, budget, 36) == (1, 1)


def test_analysis_threads_are_restored_afterwards(monkeypatch):
    from analysis import pipeline, scheduler

    monkeypatch.setattr(scheduler, "available_cores", lambda: 4)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        base, tuned = planted_pair(5)
        plan = ComparisonPlan("b", "t", "adapter", [plan_of(f"m{i}", base, tuned) for i in range(6)])
        seen: list[int] = []
        real = pipeline._group_metrics
        monkeypatch.setattr(pipeline, "_group_metrics", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
        list(analyse_plan(plan, device="cpu", workers=4))
        assert seen == [1] * 6  # four matrices at once on four cores: one thread each
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("base", "tuned"),
    [("tiny_llama", "tiny_llama_full_ft"), ("tiny_gpt2", "tiny_gpt2_lora"), ("tiny_llama", "tiny_llama_kohya")],
)
def test_fully_cached_run_reads_no_weights(tmp_path, request, monkeypatch, base, tuned):
    """Real files: the second run finds every pair through the fingerprint index alone."""
    from analysis.adapters import LoraAdapter
    from analysis.compare import plan_models
    from analysis.sources import WeightSource

    base_path, tuned_path = request.getfixturevalue(base), request.getfixturevalue(tuned)
    first = list(analyse_plan(plan_models(str(base_path), [str(tuned_path)])[0], cache=SpectrumCache(tmp_path)))

    (plan,) = plan_models(str(base_path), [str(tuned_path)])  # opening an adapter may read factors

    def refuse(self, name):
        raise AssertionError(f"read {name} although every result is cached")

    monkeypatch.setattr(WeightSource, "load", refuse)
    monkeypatch.setattr(LoraAdapter, "load", refuse)
    cache = SpectrumCache(tmp_path)  # a new process: the index and entries on disk only
    second = list(analyse_plan(plan, cache=cache))
    # each pair's entry, and the plan's measures in one (update_measures.read_set)
    assert cache.stats.hits == len(plan.matrices) + 1 > 1 and cache.fingerprints.hashed == 0
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.intruder_scores, b.intruder_scores)


def test_plan_digests_tell_apart_what_differs(tmp_path, tiny_llama, tiny_llama_full_ft, tiny_llama_lora, peft_adapter):
    """Equal digests only for equal matrices: same base, another fine-tune, another adapter."""
    from analysis.cache import FingerprintIndex
    from analysis.compare import plan_models

    index = FingerprintIndex(tmp_path)
    variants = [tiny_llama_full_ft, tiny_llama_lora, peft_adapter("llama", "rslora")]
    plans = plan_models(str(tiny_llama), [str(v) for v in variants])
    by_plan = [{m.name: m.digests(index.digest) for m in p.matrices} for p in plans]
    shared = set(by_plan[0]) & set(by_plan[1]) & set(by_plan[2])
    assert shared
    for name in shared:
        bases = {d[name][0] for d in by_plan}
        tuned = {d[name][1] for d in by_plan}
        assert len(bases) == 1  # one base matrix, one digest
        assert len(tuned) == 3 and not tuned & bases
    matrices = {m.name: m for m in plans[0].matrices}
    for name, (base_digest, tuned_digest) in by_plan[0].items():  # the digests name what is loaded
        assert (base_digest == tuned_digest) == torch.equal(
            matrices[name].load_base(), matrices[name].load_tuned().weight
        )


@pytest.mark.parametrize("shape", [(300, 300), (420, 260), (260, 420)], ids=["square", "tall", "wide"])
def test_tridiagonal_top_vectors_match_float64_svd(shape):
    """All values and only the top vectors (analysis.lapack), as the tuned weight gets them."""
    from analysis import lapack

    assert lapack.available()
    m, n = shape
    w = trained_like(m, n, seed=11)
    u, s, v = reference(w)
    spectrum = decompose(w, CPU, "gram", top=40)
    assert spectrum._provider is not None  # the tridiagonal path was taken
    np.testing.assert_allclose(spectrum.values.numpy(), s, rtol=1e-9, atol=1e-12 * s[0])
    gram_side_left = m <= n  # that side's vectors come from LAPACK (float64), the other is derived (float32)
    assert_same_vectors(spectrum.left(40), u[:, :40], 1e-9 if gram_side_left else 1e-5)
    assert_same_vectors(spectrum.right(40), v[:, :40], 1e-5 if gram_side_left else 1e-9)


def test_tridiagonal_vectors_on_demand_cover_any_number():
    """The update's spectrum: values now, 10, then 200, then every vector when asked."""
    w = trained_like(260, 300, seed=12)
    u, s, _ = reference(w)
    lazy = decompose(w, CPU, "gram", vectors=torch.float32)
    np.testing.assert_allclose(lazy.values.numpy(), s, rtol=1e-9, atol=1e-12 * s[0])
    assert_same_vectors(lazy.left(10), u[:, :10], 1e-9)
    assert_same_vectors(lazy.left(200), u[:, :200], 1e-7)
    everything = lazy.left().double()
    torch.testing.assert_close(everything.T @ everything, torch.eye(260, dtype=torch.float64), atol=1e-9, rtol=0)


def test_tridiagonal_failures_fall_back_to_a_full_decomposition(monkeypatch):
    from analysis import lapack

    w = trained_like(260, 300, seed=13)
    u, s, _ = reference(w)
    monkeypatch.setattr(lapack.Tridiagonal, "top", lambda self, k: None)  # LAPACK's checks failed
    for spectrum in (decompose(w, CPU, "gram", top=40), decompose(w, CPU, "gram", vectors=torch.float32)):
        np.testing.assert_allclose(spectrum.values.numpy(), s, rtol=1e-9, atol=1e-12 * s[0])
        assert_same_vectors(spectrum.left(40), u[:, :40], 1e-6)


def test_tridiagonal_refuses_what_inverse_iteration_cannot_do():
    from analysis.lapack import Tridiagonal

    assert Tridiagonal(np.zeros((10, 10))).top(3) is None  # splits everywhere
    diagonal = Tridiagonal(np.diag(np.arange(10.0)))
    np.testing.assert_allclose(diagonal.values, np.arange(10.0)[::-1])
    assert diagonal.splits and diagonal.top(3) is None
    g = np.random.default_rng(0).standard_normal((50, 50))
    full = Tridiagonal(g @ g.T)
    assert full.top(0).shape == (50, 0) and full.top(50).shape == (50, 50)


def test_tridiagonal_checks_reject_wrong_or_dependent_vectors():
    """Inverse iteration's output is checked on the tridiagonal matrix: residuals and
    orthonormality, each able to reject on its own."""
    from analysis.lapack import Tridiagonal

    g = np.random.default_rng(1).standard_normal((60, 80))
    reduced = Tridiagonal(g @ g.T)
    assert reduced.top(5) is not None
    t = np.diag(reduced._d) + np.diag(reduced._e[:59], 1) + np.diag(reduced._e[:59], -1)
    values, vectors = np.linalg.eigh(t)
    z, lam = np.ascontiguousarray(vectors[:, -3:].T), values[-3:]
    assert reduced._accurate(z.copy(), lam)
    off = z.copy()  # still orthonormal, but turned 1e-4 towards an eigenvector not asked for
    off[0] = np.cos(1e-4) * z[0] + np.sin(1e-4) * vectors[:, 0]
    assert not reduced._accurate(off, lam)  # no longer an eigenvector
    twice = z.copy()
    twice[0], lam_twice = z[1], np.array([lam[1], lam[1], lam[2]])
    assert not reduced._accurate(twice, lam_twice)  # eigenvectors, but the same one twice
    assert not reduced._accurate(np.full_like(z, np.nan), lam)


@pytest.mark.parametrize("path", ["tridiagonal", "subspace"])
def test_pipeline_on_tridiagonal_sized_matrices_matches_float64(monkeypatch, path):
    """A 256 x 320 pair: the tuned weight's top 100 of 256 via the tridiagonal path, or via
    seeded subspace iteration (the path of large matrices, and of any without SciPy)."""
    started: list = []
    if path == "subspace":
        monkeypatch.setattr(linalg, "SUBSPACE_MIN_SIZE", 64)
        monkeypatch.setattr(linalg, "SUBSPACE_MAX_FRACTION", 0.5)
        monkeypatch.setattr(linalg.lapack, "available", lambda: False)
        iterate = linalg.top_eigenvectors
        monkeypatch.setattr(
            linalg,
            "top_eigenvectors",
            lambda g, e, k, start=None, **kw: started.append(start) or iterate(g, e, k, start, **kw),
        )
    base = trained_like(256, 320, seed=14)
    g = torch.Generator().manual_seed(15)
    B, A = torch.randn(256, 4, generator=g), torch.randn(4, 320, generator=g) / 320**0.5
    planted = LowRankDelta(B, A, 2.0)
    tuned = TunedMatrix(base + planted.dense(), planted)
    dense = TunedMatrix(base + planted.dense(), None)
    for matrix in (tuned, dense):
        result = analyse_matrix(plan_of("m", base, matrix), device="cpu")
        u0, _, _ = reference(base)
        ut, st, _ = reference(matrix.weight)
        expected = np.abs(ut[:, :100].T @ u0).max(axis=1)
        close = np.abs(expected[:, None] - np.asarray(DEFAULT_EPSILONS)[None, :]) <= MARGIN
        for i, eps in enumerate(DEFAULT_EPSILONS):
            if not close[:, i].any():
                assert int((result.intruder_scores[:100] < eps).sum()) == int((expected < eps).sum())
        np.testing.assert_allclose(result.tuned_singular_values, st, rtol=1e-5, atol=1e-6 * st[0])
        sd = np.linalg.svd((matrix.weight.double() - base.double()).numpy(), compute_uv=False)
        np.testing.assert_allclose(result.delta_singular_values[:4], sd[:4], rtol=1e-5)
    if path == "subspace":  # seeded: the base's top vectors, and the adapter's B for the adapter
        # (the unseeded calls are the base's top-k of the RL-versus-SFT measures)
        assert [s.shape[1] for s in started if s is not None] == [4 + 200, 200]
