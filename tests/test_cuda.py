"""The CUDA path against CPU float64 references. Skipped where no CUDA device exists.

On CUDA the engine's default is the ``eig`` method (float64 Gram matrices: ``eigvalsh``
for values, seeded subspace iteration for top vectors, ``eigh`` for a base that is not
cached; the same torch code ``tests/test_eig_path.py`` runs on the CPU); cuSOLVER's
batched ``gesvda`` stays selectable (``WSE_SVD_METHOD=gesvda``). These tests hold both to
the benchmark guard's tolerances: intruder counts equal to float64 at every eps of the
grid except where a score lies within 1e-3 of eps, top-10 singular values within 1e-4
relative. They also check that a pair's analysis stays within a GPU memory bound derived
from what the engine holds.

Run on a GPU machine: ``pytest tests/test_cuda.py -q -p no:cacheprovider`` (or the whole
prepared check, ``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.identity import MatrixId
from analysis.linalg import decompose, decompose_many
from analysis.pipeline import analyse_matrix
from analysis.plan import MatrixPlan, TunedMatrix
from analysis.results import DEFAULT_EPSILONS
from tests.spectra import reference, trained_like, trained_pair

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")
MARGIN = 1e-3


@pytest.mark.parametrize("method", ["gesvda", "gram", "eig"])
@pytest.mark.parametrize("shape", [(512, 512), (1024, 384), (384, 1024)], ids=["square", "tall", "wide"])
def test_cuda_decomposition_matches_float64(method, shape):
    w = trained_like(*shape, seed=1)
    u, s, v = reference(w)
    spectrum = decompose(w.to(CUDA), CUDA, method)
    values = spectrum.values.double().cpu().numpy()
    np.testing.assert_allclose(values[:10], s[:10], rtol=1e-4)
    assert np.max(np.abs(values - s)) < 1e-3 * s[0]
    for got, expected in ((spectrum.left(10), u[:, :10]), (spectrum.right(10), v[:, :10])):
        cosines = np.abs(np.sum(got.double().cpu().numpy() * expected, axis=0))
        assert cosines.min() > 1 - 1e-4


def test_seeded_top_vectors_on_cuda(monkeypatch):
    from analysis import linalg

    monkeypatch.setattr(linalg, "SUBSPACE_MIN_SIZE", 256)  # production: from 3072 on
    base = trained_like(1024, 640, seed=2)
    tuned = base + 0.02 * trained_like(1024, 640, seed=12)
    u, s, _ = reference(tuned)
    calls = []
    real = linalg.top_eigenvectors
    monkeypatch.setattr(linalg, "top_eigenvectors", lambda *a, **k: calls.append(1) or real(*a, **k))
    seeds = decompose(base.to(CUDA), CUDA, "eig").left(80)
    spectrum = decompose(tuned.to(CUDA), CUDA, "eig", top=40, seeds=seeds)
    assert calls == [1] and spectrum.values.device.type == "cuda"
    np.testing.assert_allclose(spectrum.values.cpu().numpy(), s, rtol=1e-8, atol=1e-10 * s[0])
    cosines = np.abs(np.sum(spectrum.left(40).double().cpu().numpy() * u[:, :40], axis=0))
    assert cosines.min() > 1 - 1e-6


def test_batched_gesvda_equals_one_by_one():
    weights = [trained_like(256, 192, seed=i).to(CUDA) for i in range(3)]
    batched = decompose_many(weights, CUDA, "gesvda")
    for w, b in zip(weights, batched, strict=True):
        single = decompose(w, CUDA, "gesvda")
        torch.testing.assert_close(b.values, single.values, rtol=1e-5, atol=1e-6)
        cosines = (b.left(10) * single.left(10)).sum(0).abs()
        assert float(cosines.min()) > 1 - 1e-5


def _plan(base: torch.Tensor, tuned: TunedMatrix, rank: int | None) -> MatrixPlan:
    return MatrixPlan(MatrixId("m", 0, "q", tuple(base.shape)), lambda: base.clone(), lambda: tuned, adapter_rank=rank)


@pytest.mark.parametrize("method", ["eig", "gesvda"])
@pytest.mark.parametrize("adapter", [False, True], ids=["full", "adapter"])
def test_cuda_pipeline_agrees_with_float64(adapter, method, monkeypatch):
    monkeypatch.setenv("WSE_SVD_METHOD", method)
    base, tuned, rank = trained_pair(768, 512, adapter)
    gpu = analyse_matrix(_plan(base, tuned, rank), device="cuda")
    u0, s0, _ = reference(base)
    ut, st, _ = reference(tuned.weight)
    expected = np.abs(ut[:, :10].T @ u0).max(axis=1)
    for eps in DEFAULT_EPSILONS:
        if np.all(np.abs(expected - eps) > MARGIN):
            assert gpu.intruder_counts(10, [eps]) == [int(np.sum(expected < eps))]
    np.testing.assert_allclose(gpu.tuned_singular_values[:10], st[:10], rtol=1e-4)
    np.testing.assert_allclose(gpu.base_singular_values[:10], s0[:10], rtol=1e-4)
    monkeypatch.delenv("WSE_SVD_METHOD")
    cpu = analyse_matrix(_plan(base, tuned, rank), device="cpu")
    assert gpu.rank90 == cpu.rank90
    assert gpu.effective_rank == pytest.approx(cpu.effective_rank, rel=1e-3)
    assert gpu.amplification_factor == pytest.approx(cpu.amplification_factor, rel=1e-3)


def test_gpu_memory_of_a_7b_sized_pair_is_bounded():
    """One 4096 x 4096 pair, cold, default method (``eig``): a few n x n arrays, not a model.

    The bound from what the engine holds at its peak (n = 4096; an n x n float64 array is
    128 MiB): the base and tuned weights in float32 (2 x 64 MiB); while a matrix is
    decomposed, its float64 copy, its float64 Gram matrix and ``eigh``'s eigenvectors plus
    cuSOLVER's ``syevd`` workspace (about 2 n^2 float64), i.e. 5 x 128 MiB; beside it the
    update in float64 (128 MiB, the tuned decomposition's seeds and the stored float16 base
    vectors are small). 2 x 64 + 6 x 128 = 896 MiB, bounded at 1.25 GiB for the caching
    allocator's rounding and cuBLAS/cuSOLVER handles. The former gesvda path held full U
    and V of the base, the tuned weight and the update in one batch (3.47 GiB measured).
    """
    base = trained_like(4096, 4096, seed=6)
    tuned = TunedMatrix(base + 0.02 * trained_like(4096, 4096, seed=7))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    analyse_matrix(_plan(base, tuned, None), device="cuda")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    print(f"GPU peak of a 4096 x 4096 pair: {peak / 1024**3:.2f} GiB")
    assert peak < 1.25 * 1024**3


@pytest.mark.parametrize("vectors", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shape", [(24, 40), (768, 2048), (2048, 768)], ids=["order-24", "expert", "expert-down"])
def test_a_matrix_gets_the_same_bits_in_any_cuda_batch(shape, vectors):
    """The ``eig`` method diagonalises same-shaped matrices (MoE experts) in batched calls:
    a matrix must get the same bits alone (padded to a batch of two), in a batch of five
    and in another batch, or a pair's cached bytes would depend on its companions. Order
    24 is where torch picks cuSOLVER's ``syevjBatched`` (order <= 32)."""
    from analysis import linalg

    experts = [trained_like(*shape, seed=20 + i).to(CUDA) for i in range(5)]
    together = decompose_many(experts, CUDA, "eig", vectors=vectors)
    alone = [decompose(w, CUDA, "eig", vectors=vectors) for w in experts]
    others = decompose_many(experts[::-1][:3], CUDA, "eig", vectors=vectors)[::-1]
    assert linalg.BATCH_MAX_ORDER >= min(shape)

    def bits(spectrum):
        return spectrum.values.cpu().numpy().tobytes(), spectrum.left(20).cpu().numpy().tobytes()

    assert [bits(s) for s in together] == [bits(s) for s in alone]
    assert [bits(s) for s in others] == [bits(s) for s in alone[2:]]
    u, s, _ = reference(experts[0].cpu())
    np.testing.assert_allclose(together[0].values.cpu().numpy(), s, rtol=1e-8, atol=1e-10 * s[0])


def test_cuda_experts_analysed_together_get_the_bytes_each_gets_alone():
    """An expert layer through the pipeline on CUDA: grouped pairs (batched decompositions)
    give every pair the bytes it gets analysed alone, and agree with float64."""
    from analysis.pipeline import analyse_plan
    from analysis.plan import ComparisonPlan

    pairs = [trained_pair(384, 1024, adapter=i % 2 == 1, seed=40 + i) for i in range(6)]
    matrices = [
        MatrixPlan(
            MatrixId(f"e.{i}.up", 0, "up", (384, 1024), expert=i), lambda b=b: b.clone(), lambda t=t: t, adapter_rank=r
        )
        for i, (b, t, r) in enumerate(pairs)
    ]
    grouped = list(analyse_plan(ComparisonPlan("base", "tuned", "full", matrices), device="cuda"))
    alone = [analyse_matrix(m, device="cuda") for m in matrices]

    def fields(r) -> bytes:
        arrays = (r.base_singular_values, r.tuned_singular_values, r.delta_singular_values, r.intruder_scores)
        return b"".join(a.tobytes() for a in (*arrays, r.similarity, r.delta_left_vectors))

    assert [fields(r) for r in grouped] == [fields(r) for r in alone]
    for r, (base, tuned, _) in zip(grouped, pairs, strict=True):
        np.testing.assert_allclose(r.tuned_singular_values[:10], reference(tuned.weight)[1][:10], rtol=1e-4)
        np.testing.assert_allclose(r.base_singular_values[:10], reference(base)[1][:10], rtol=1e-4)
