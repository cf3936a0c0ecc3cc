"""The ``eig`` method (the CUDA default) run on CPU tensors against float64 references.

The same torch calls run on a GPU (``tests/test_cuda.py`` repeats the checks there):
values from ``eigvalsh`` of the float64 Gram matrix, top vectors by seeded subspace
iteration checked by residual (full ``eigh`` as the fallback), every vector only for a
base. NumPy's and SciPy's CPU routines must not be used on this path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import lapack, linalg
from analysis.identity import MatrixId
from analysis.linalg import decompose, decompose_many
from analysis.pipeline import analyse_matrix
from analysis.plan import MatrixPlan, TunedMatrix
from analysis.results import DEFAULT_EPSILONS
from tests.spectra import reference, trained_like, trained_pair

CPU = torch.device("cpu")
MARGIN = 1e-3


@pytest.fixture
def torch_only(monkeypatch):
    """Fail if the CPU-only routines (NumPy's syrk Gram, SciPy's tridiagonal solver) run."""

    def refuse(*args, **kwargs):
        raise AssertionError("the eig method must use torch calls only")

    monkeypatch.setattr(linalg, "gram_matrix", refuse)
    monkeypatch.setattr(lapack, "Tridiagonal", refuse)


@pytest.mark.parametrize("shape", [(256, 256), (384, 160), (160, 384)], ids=["square", "tall", "wide"])
def test_eig_decomposition_matches_float64(shape, torch_only):
    w = trained_like(*shape, seed=1)
    u, s, v = reference(w)
    spectrum = decompose(w, CPU, "eig")
    np.testing.assert_allclose(spectrum.values.numpy(), s, rtol=1e-9, atol=1e-7 * s[0])
    for got, expected in ((spectrum.left(10), u[:, :10]), (spectrum.right(10), v[:, :10])):
        cosines = np.abs(np.sum(got.double().numpy() * expected, axis=0))
        assert cosines.min() > 1 - 1e-6  # the side derived from the weight is float32 (Spectrum._derive)
    every = spectrum.left().double().numpy()  # a base's full set: orthonormal
    np.testing.assert_allclose(every.T @ every, np.eye(every.shape[1]), atol=1e-8)


@pytest.mark.parametrize("tall", [False, True], ids=["wide", "tall"])
def test_eig_top_vectors_by_seeded_subspace_iteration(monkeypatch, torch_only, tall):
    monkeypatch.setattr(linalg, "SUBSPACE_MIN_SIZE", 256)  # production: from 3072 on (top <= 1/8)
    calls = []
    real = linalg.top_eigenvectors
    monkeypatch.setattr(linalg, "top_eigenvectors", lambda *a, **k: calls.append(1) or real(*a, **k))
    base = trained_like(320, 512, seed=2)
    tuned = base + 0.02 * trained_like(320, 512, seed=12)
    if tall:
        base, tuned = base.T.contiguous(), tuned.T.contiguous()
    u, s, _ = reference(tuned)
    seeds = decompose(base, CPU, "eig").left(64)
    spectrum = decompose(tuned, CPU, "eig", top=32, seeds=seeds)
    assert calls == [1]  # the subspace iteration ran (and was accepted: no eigh of the tuned Gram)
    np.testing.assert_allclose(spectrum.values.numpy(), s, rtol=1e-8, atol=1e-10 * s[0])
    cosines = np.abs(np.sum(spectrum.left(32).double().numpy() * u[:, :32], axis=0))
    assert cosines.min() > 1 - 1e-6


def test_eig_falls_back_to_a_full_eigh_when_the_residual_check_fails(monkeypatch, torch_only):
    monkeypatch.setattr(linalg, "SUBSPACE_MIN_SIZE", 128)
    monkeypatch.setattr(linalg, "top_eigenvectors", lambda *a, **k: None)  # never converges
    w = trained_like(300, 200, seed=3)
    u, s, _ = reference(w)
    spectrum = decompose(w, CPU, "eig", top=20)
    np.testing.assert_allclose(spectrum.values.numpy(), s, rtol=1e-9, atol=1e-7 * s[0])
    cosines = np.abs(np.sum(spectrum.left(20).double().numpy() * u[:, :20], axis=0))
    assert cosines.min() > 1 - 1e-6


def _plan(base: torch.Tensor, tuned: TunedMatrix, rank: int | None) -> MatrixPlan:
    return MatrixPlan(MatrixId("m", 0, "q", tuple(base.shape)), lambda: base.clone(), lambda: tuned, adapter_rank=rank)


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "adapter"])
def test_eig_pipeline_agrees_with_float64_and_the_cpu_method(monkeypatch, adapter):
    monkeypatch.setattr(linalg, "SUBSPACE_MIN_SIZE", 256)  # the seeded path, as for a 7B matrix
    monkeypatch.setattr(linalg, "SUBSPACE_MAX_FRACTION", 0.5)  # the top 100 of 256
    base, tuned, rank = trained_pair(384, 256, adapter)
    monkeypatch.setenv("WSE_SVD_METHOD", "eig")
    eig = analyse_matrix(_plan(base, tuned, rank), device="cpu")
    monkeypatch.setenv("WSE_SVD_METHOD", "gram")
    gram = analyse_matrix(_plan(base, tuned, rank), device="cpu")
    u0, s0, _ = reference(base)
    ut, st, _ = reference(tuned.weight)
    sd = np.linalg.svd((tuned.weight.double() - base.double()).numpy(), compute_uv=False)
    expected = np.abs(ut[:, :10].T @ u0).max(axis=1)
    for eps in DEFAULT_EPSILONS:
        if np.all(np.abs(expected - eps) > MARGIN):
            assert eig.intruder_counts(10, [eps]) == [int(np.sum(expected < eps))]
    np.testing.assert_allclose(eig.tuned_singular_values, st, rtol=1e-6, atol=1e-6 * st[0])
    np.testing.assert_allclose(eig.base_singular_values, s0, rtol=1e-6, atol=1e-6 * s0[0])
    top = min(10, len(eig.delta_singular_values))  # an adapter's update has r values
    np.testing.assert_allclose(eig.delta_singular_values[:top], sd[:top], rtol=1e-5)
    np.testing.assert_allclose(eig.intruder_scores, gram.intruder_scores, atol=2e-3)  # float16 base vectors
    assert eig.rank90 == gram.rank90
    assert eig.effective_rank == pytest.approx(gram.effective_rank, rel=1e-6)
    assert eig.amplification_factor == pytest.approx(gram.amplification_factor, rel=1e-5)


def _bits(spectrum: linalg.Spectrum, k: int) -> tuple[bytes, bytes]:
    return spectrum.values.numpy().tobytes(), spectrum.left(k).numpy().tobytes()


@pytest.mark.parametrize("vectors", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_eig_batches_same_shaped_matrices_and_each_keeps_the_bits_it_gets_alone(monkeypatch, torch_only, vectors):
    """Same-shaped small matrices (a mixture-of-experts layer's experts) are diagonalised in
    one batched call; a matrix gets the same bits alone, in any batch, in any position."""
    batches = []
    real = linalg._batched_gram_spectra
    monkeypatch.setattr(linalg, "_batched_gram_spectra", lambda ws, v: batches.append(len(ws)) or real(ws, v))
    experts = [trained_like(96, 160, seed=20 + i) for i in range(5)]
    odd = trained_like(160, 96, seed=30)  # another shape: a batch of its own
    together = decompose_many([*experts[:3], odd, *experts[3:]], CPU, "eig", vectors=vectors)
    assert sorted(batches) == [1, 5]
    alone = [decompose(w, CPU, "eig", vectors=vectors) for w in experts]
    reordered = decompose_many(experts[::-1][:3], CPU, "eig", vectors=vectors)[::-1]  # experts 2, 3, 4
    for got, single in zip([*together[:3], *together[4:]], alone, strict=True):
        assert _bits(got, 20) == _bits(single, 20)
    for got, single in zip(reordered, alone[2:], strict=True):
        assert _bits(got, 20) == _bits(single, 20)
    for w, spectrum in zip([*experts[:3], odd, *experts[3:]], together, strict=True):
        u, s, v = reference(w)
        np.testing.assert_allclose(spectrum.values.numpy(), s, rtol=1e-9, atol=1e-7 * s[0])
        tol = 1e-6 if vectors == torch.float64 else 1e-4
        for got, expected in ((spectrum.left(10), u[:, :10]), (spectrum.right(10), v[:, :10])):
            assert np.abs(np.sum(got.double().numpy() * expected, axis=0)).min() > 1 - tol


def test_group_matrices_batches_same_shaped_small_matrices_of_a_layer():
    from analysis.grouping import MAX_GROUP, group_matrices
    from analysis.scheduler import working_bytes

    def plan(name: str, layer: int, shape: tuple[int, int]) -> MatrixPlan:
        return MatrixPlan(MatrixId(name, layer, "m", shape), lambda: None, lambda: None)

    # A per-expert checkpoint's order: each expert's down, gate and up in turn, then layer 1.
    gate, down, big = (32, 64), (64, 32), (linalg.BATCH_MAX_ORDER + 1,) * 2
    experts = MAX_GROUP + 2
    matrices = [plan("q", 0, (64, 64)), plan("big", 0, big)]
    for e in range(experts):
        matrices += [plan(f"d{e}", 0, down), plan(f"g{e}", 0, gate), plan(f"u{e}", 0, gate)]
    matrices += [plan("d-next-layer", 1, down), plan("g-next-layer", 1, gate)]
    names = [[matrices[i].name for i in g] for g in group_matrices(matrices, "eig", 1 << 40)]
    gates_and_ups = [n for e in range(experts) for n in (f"g{e}", f"u{e}")]
    assert names == [
        ["q"],
        ["big"],
        [f"d{e}" for e in range(MAX_GROUP)],
        gates_and_ups[:MAX_GROUP],
        gates_and_ups[MAX_GROUP : 2 * MAX_GROUP],
        [f"d{e}" for e in range(MAX_GROUP, experts)],
        gates_and_ups[2 * MAX_GROUP :],
        ["d-next-layer"],
        ["g-next-layer"],
    ]
    assert all(len(g) == 1 for g in group_matrices(matrices, "gram", 1 << 40))  # the CPU method: one by one
    fits_three = 3 * working_bytes(gate, "eig")  # the memory a group may hold
    sizes = [len(g) for g in group_matrices(matrices[2:], "eig", fits_three)]
    assert max(sizes) == 3 and sum(sizes) == len(matrices) - 2


def test_eig_pipeline_analyses_experts_together_with_the_bytes_each_pair_gets_alone(monkeypatch, tmp_path):
    """A mixture-of-experts layer through the ``eig`` method: same-shaped experts are
    decomposed in batches (bases, tuned weights, updates), a pair's bytes equal those it
    gets analysed alone, and a group of which some pairs are cached computes the rest."""
    from analysis import pipeline
    from analysis.cache import SpectrumCache
    from analysis.pair_metrics import AnalysisSettings
    from analysis.pipeline import analyse_plan
    from analysis.plan import ComparisonPlan

    monkeypatch.setenv("WSE_SVD_METHOD", "eig")
    # Each expert's down (160 x 96) then up (96 x 160), as a per-expert checkpoint lists them.
    shapes = [(160, 96), (96, 160)] * 3
    pairs = [trained_pair(*shape, adapter=i % 4 == 1, seed=40 + i) for i, shape in enumerate(shapes)]
    matrices = [
        MatrixPlan(
            MatrixId(f"e.{i // 2}.{i % 2}", 0, "m", s, expert=i), lambda b=b: b.clone(), lambda t=t: t, adapter_rank=r
        )
        for i, ((b, t, r), s) in enumerate(zip(pairs, shapes, strict=True))
    ]
    plan = ComparisonPlan("base", "tuned", "full", matrices)
    batches = []
    real = linalg._batched_gram_spectra
    monkeypatch.setattr(linalg, "_batched_gram_spectra", lambda ws, v: batches.append(len(ws)) or real(ws, v))
    events = []
    # The spectra's batches only: the RL-versus-SFT measures decompose each base's top-k on their own.
    off = AnalysisSettings(measures=False)
    grouped = list(analyse_plan(plan, device="cpu", progress=events.append, settings=off))
    assert [r.name for r in grouped] == [m.name for m in matrices] == [e.matrix for e in events]  # plan order
    # Per shape: bases and tuned weights of 3 pairs; dense updates: 3 downs, 1 up (1 adapter).
    assert sorted(batches) == [1, 3, 3, 3, 3, 3]
    batches.clear()
    alone = [pipeline.analyse_matrix(m, device="cpu", settings=off) for m in matrices]
    assert batches == [1] * 16  # each pair alone: base, tuned weight, and the update of the four dense ones

    def fields(r) -> bytes:
        arrays = (r.base_singular_values, r.tuned_singular_values, r.delta_singular_values, r.intruder_scores)
        return b"".join(a.tobytes() for a in (*arrays, r.similarity, r.delta_left_vectors))

    assert [fields(r) for r in grouped] == [fields(r) for r in alone]
    for r, (_, tuned, _) in zip(grouped, pairs, strict=True):
        np.testing.assert_allclose(r.tuned_singular_values, reference(tuned.weight)[1], rtol=1e-6)

    cache = SpectrumCache(tmp_path)
    list(analyse_plan(ComparisonPlan("base", "tuned", "full", matrices[2:4]), device="cpu", cache=cache, settings=off))
    batches.clear()
    cached = list(analyse_plan(plan, device="cpu", cache=cache, settings=off))
    assert sorted(batches) == [2, 2, 2, 2, 2]  # only the pairs not cached: downs 0, 4 and adapters 1, 5
    assert [fields(r) for r in cached] == [fields(r) for r in alone]
