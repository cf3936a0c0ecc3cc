"""Each metric against a slow, obviously-correct float64 reference (docs/metrics.md definitions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis import metrics
from analysis.linalg import low_rank_svd, thin_svd
from analysis.plan import LowRankDelta

CPU = torch.device("cpu")


def spectrum_matrix(m: int, n: int, decay: float, seed: int) -> torch.Tensor:
    """A matrix with a known, decaying spectrum s_i = exp(-i / decay)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    r = min(m, n)
    s = torch.exp(-torch.arange(r, dtype=torch.float64) / decay)
    return U[:, :r] @ torch.diag(s) @ V[:, :r].T


def matrices():
    g = torch.Generator().manual_seed(0)
    yield "gaussian", torch.randn(48, 32, generator=g, dtype=torch.float64)
    yield "wide", torch.randn(24, 40, generator=g, dtype=torch.float64)
    yield "decaying", spectrum_matrix(40, 40, decay=5.0, seed=1)
    yield (
        "rank3",
        torch.randn(30, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 20, generator=g, dtype=torch.float64),
    )


# -- slow float64 references, written as the definitions read ---------------------------


def ref_svd(w: torch.Tensor):
    u, s, vt = np.linalg.svd(w.numpy().astype(np.float64), full_matrices=False)
    return u, s, vt.T


def ref_intruder_scores(tuned_u: np.ndarray, base_u: np.ndarray, k: int) -> list[float]:
    scores = []
    for j in range(k):
        best = 0.0
        for i in range(base_u.shape[1]):
            best = max(best, abs(float(np.dot(tuned_u[:, j], base_u[:, i]))))
        scores.append(best)
    return scores


def ref_effective_rank(s: np.ndarray) -> float:
    s = [float(x) for x in s if x > 1e-12 * max(s.max(), 1e-300)]
    if not s:
        return 0.0
    total = sum(s)
    return math.exp(-sum((x / total) * math.log(x / total) for x in s))


def ref_rank90(s: np.ndarray) -> int:
    total = sum(float(x) ** 2 for x in s)
    running = 0.0
    for r, x in enumerate(s, start=1):
        running += float(x) ** 2
        if running >= 0.9 * total:
            return r
    return len(s)


def ref_phi(P: np.ndarray, Q: np.ndarray, i: int, j: int) -> float:
    return float(np.linalg.norm(P[:, :i].T @ Q[:, :j], "fro") ** 2 / min(i, j))


# -- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("name,w", list(matrices()))
def test_spectral_rank_metrics_match_float64_reference(name, w):
    _, s, _ = ref_svd(w)
    _, s32, _ = thin_svd(w.float(), CPU)
    # rank-deficient matrices: compare on the float64 spectrum, where "nonzero" is exact
    assert metrics.effective_rank(s) == pytest.approx(ref_effective_rank(s), rel=1e-9)
    assert metrics.rank90(s) == ref_rank90(s)
    assert metrics.stable_rank(s) == pytest.approx(np.linalg.norm(w.numpy(), "fro") ** 2 / s[0] ** 2, rel=1e-9)
    assert metrics.frobenius_norm(s) == pytest.approx(np.linalg.norm(w.numpy(), "fro"), rel=1e-9)
    if name != "rank3":  # float32 round-off singular values are "nonzero" noise there
        assert metrics.effective_rank(s32) == pytest.approx(ref_effective_rank(s), rel=1e-4)
    assert metrics.rank90(s32) == ref_rank90(s)


def test_effective_rank_known_values():
    assert metrics.effective_rank(np.ones(7)) == pytest.approx(7.0)
    assert metrics.effective_rank(np.array([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert metrics.effective_rank(np.zeros(5)) == 0.0
    assert metrics.rank90(np.zeros(5)) == 0
    assert metrics.stable_rank(np.zeros(5)) == 0.0
    # rank90 on an exact boundary: 9 equal values of energy 1 and one of energy 1 -> 9/10 = 0.9
    assert metrics.rank90(np.ones(10)) == 9


@pytest.mark.parametrize("name,w", list(matrices())[:3])
def test_intruder_scores_and_similarity_match_reference(name, w):
    g = torch.Generator().manual_seed(5)
    tuned = w + 0.3 * torch.randn(w.shape, generator=g, dtype=torch.float64)
    U0, _, _ = ref_svd(w)
    Ut, _, _ = ref_svd(tuned)
    k = 10
    expected = ref_intruder_scores(Ut, U0, k)

    U0_32, _, _ = thin_svd(w.float(), CPU)
    Ut_32, _, _ = thin_svd(tuned.float(), CPU)
    scores, best = metrics.intruder_scores(Ut_32[:, :k], U0_32)
    np.testing.assert_allclose(scores, expected, atol=2e-4)
    for j in range(k):
        assert abs(np.dot(Ut[:, j], U0[:, best[j]])) == pytest.approx(expected[j], abs=2e-4)
    for eps in (0.1, 0.3, 0.5, 0.7, 0.9):
        reference_count = sum(score < eps for score in expected)
        if all(abs(score - eps) > 1e-3 for score in expected):
            assert metrics.count_intruders(scores, eps) == reference_count
    sim = metrics.similarity_matrix(torch.from_numpy(Ut), torch.from_numpy(U0), 8)
    assert sim.shape == (8, 8)
    for r in range(8):
        for c in range(8):
            assert sim[r, c] == pytest.approx(abs(float(Ut[:, r] @ U0[:, c])), abs=1e-6)


def test_intruder_counts_over_a_grid():
    scores = np.array([0.05, 0.2, 0.49, 0.5, 0.95])
    assert metrics.intruder_counts(scores, [0.1, 0.5, 0.9, 1.0]) == [1, 3, 4, 5]


def test_planted_intruder_is_found_and_small_dense_update_is_not():
    """Shuttleworth et al.: a new high-ranking direction orthogonal-ish to the base is an intruder."""
    base = spectrum_matrix(256, 256, decay=30.0, seed=3).float()
    g = torch.Generator().manual_seed(11)
    v = torch.randn(256, 1, generator=g)
    v /= v.norm()
    s_top = float(torch.linalg.matrix_norm(base, ord=2))
    planted = base + 2.0 * s_top * (v @ v.T)
    small_dense = base + 1e-3 * s_top * torch.randn(256, 256, generator=g) / 16

    U0, _, _ = thin_svd(base, CPU)
    for tuned, expected_intruders in ((planted, 1), (small_dense, 0)):
        Ut, _, _ = thin_svd(tuned, CPU)
        scores, _ = metrics.intruder_scores(Ut[:, :10], U0)
        assert metrics.count_intruders(scores, 0.5) == expected_intruders
    Ut, _, _ = thin_svd(planted, CPU)
    assert abs(float(Ut[:, 0] @ v[:, 0])) > 0.99  # the intruder is the planted direction, ranked first


def test_subspace_similarity_matches_definition():
    g = torch.Generator().manual_seed(2)
    P, _ = torch.linalg.qr(torch.randn(40, 8, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.cat([P[:, :3], torch.randn(40, 5, generator=g, dtype=torch.float64)], 1))
    phi = metrics.subspace_similarity(P, Q)
    assert phi.shape == (8, 8)
    for i in range(1, 9):
        for j in range(1, 9):
            assert phi[i - 1, j - 1] == pytest.approx(ref_phi(P.numpy(), Q.numpy(), i, j), abs=1e-12)
    assert np.all((phi >= -1e-12) & (phi <= 1 + 1e-12))
    assert phi[2, 2] == pytest.approx(1.0)  # shared first three directions
    assert metrics.subspace_similarity(P, P)[7, 7] == pytest.approx(1.0)


def test_amplification_factor_matches_definition():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(30, 20, generator=g, dtype=torch.float64)
    dW = (
        0.1
        * torch.randn(30, 2, generator=g, dtype=torch.float64)
        @ torch.randn(2, 20, generator=g, dtype=torch.float64)
    )
    U, s, V = ref_svd(dW)
    r = 2
    expected = np.linalg.norm(dW.numpy(), "fro") / np.linalg.norm(U[:, :r].T @ W.numpy() @ V[:, :r], "fro")
    got = metrics.amplification_factor(
        float(np.linalg.norm(dW.numpy(), "fro")), torch.from_numpy(U[:, :r]), torch.from_numpy(V[:, :r]), W
    )
    assert got == pytest.approx(expected, rel=1e-10)
    assert metrics.amplification_factor(0.0, torch.from_numpy(U[:, :r]), torch.from_numpy(V[:, :r]), W) is None


@pytest.mark.parametrize("shape,r", [((40, 30), 4), ((16, 64), 8), ((12, 10), 16)])
def test_low_rank_svd_from_factors_is_exact(shape, r):
    g = torch.Generator().manual_seed(r)
    B = torch.randn(shape[0], r, generator=g)
    A = torch.randn(r, shape[1], generator=g)
    delta = LowRankDelta(B, A, scale=0.7)
    U, S, V = low_rank_svd(delta, CPU)
    _, s_ref, _ = ref_svd(delta.dense().double())
    n = S.shape[0]
    np.testing.assert_allclose(S.numpy(), s_ref[:n], rtol=1e-4, atol=1e-5 * s_ref[0])
    np.testing.assert_allclose((U @ torch.diag(S) @ V.T).numpy(), delta.dense().numpy(), atol=1e-4 * s_ref[0])
    torch.testing.assert_close(U.T @ U, torch.eye(n), atol=1e-5, rtol=0)
    assert np.allclose(s_ref[n:], 0, atol=1e-5 * s_ref[0])
