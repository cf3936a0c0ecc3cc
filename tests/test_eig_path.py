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
from analysis.linalg import decompose
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
    return MatrixPlan("m", 0, "q", tuple(base.shape), lambda: base.clone(), lambda: tuned, adapter_rank=rank)


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
