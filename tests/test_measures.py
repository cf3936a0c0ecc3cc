"""The RL-versus-SFT measures (issue 23) against slow float64 references written from the papers' formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles

from analysis import measures

# -- references, written as the definitions read ------------------------------------------


def ref_unchanged_relative(w0: torch.Tensor, w1: torch.Tensor, eta: float) -> int:
    """Zhu et al. Eq. 1, entry by entry in Python floats."""
    count = 0
    for a, b in zip(w0.double().reshape(-1).tolist(), w1.double().reshape(-1).tolist(), strict=True):
        count += abs(b - a) <= eta * max(abs(a), abs(b))
    return count


def ref_unchanged_absolute(w0: torch.Tensor, w1: torch.Tensor, atol: float) -> int:
    """Mukherjee et al.: the bf16 difference (exact difference of the bf16 values, rounded to bf16).

    Compared with ``atol`` rounded to bf16, as their code's ``torch.isclose`` on bf16 tensors does.
    """
    count = 0
    a16 = w0.to(torch.bfloat16).double().reshape(-1).tolist()
    b16 = w1.to(torch.bfloat16).double().reshape(-1).tolist()
    tolerance = float(torch.tensor(atol, dtype=torch.float64).to(torch.bfloat16))
    for a, b in zip(a16, b16, strict=True):
        difference = float(torch.tensor(b - a, dtype=torch.float64).to(torch.bfloat16))
        count += abs(difference) <= tolerance
    return count


def ref_numerical_rank(update: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(update.float()))


def random(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# -- update sparsity ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relative_rule_matches_its_reference(dtype):
    w0 = random((12, 9), 0, dtype)
    w1 = w0.clone()
    noise = random((12, 9), 1)
    w1 = (w0.double() + 1e-3 * noise * (random((12, 9), 2) > 0)).to(dtype)  # some entries moved
    w1[0, 0] = -w0[0, 0]  # a sign flip
    w1[1, :3] = 0
    w0[2, :2] = 0
    w1[2, :2] = 0  # 0 -> 0 is unchanged
    for eta in (1e-3, 1e-2, 0.0):
        assert int(measures.unchanged_relative(w0, w1, eta).sum()) == ref_unchanged_relative(w0, w1, eta)


def test_identical_weights_and_zero_update_are_fully_sparse():
    w = random((7, 5))
    for rule in (measures.unchanged_relative(w, w.clone()), measures.unchanged_absolute(w, w.clone())):
        assert bool(rule.all())
    zero = torch.zeros(4, 6)
    assert bool(measures.unchanged_relative(zero, zero).all())
    assert measures.update_sparsity(24, 24) == 1.0
    assert measures.update_sparsity(0, 0) is None


def test_bf16_relative_rule_with_eta_1e3_is_bitwise_equality():
    """For bf16-stored weights, Eq. 1 with eta = 1e-3 says 'unchanged' iff the stored values are equal."""
    g = torch.Generator().manual_seed(3)
    bits0 = torch.randint(-(2**15), 2**15, (200_000,), generator=g, dtype=torch.int16)
    w0 = bits0.view(torch.bfloat16)
    # neighbours (one ulp up or down), random others and exact copies
    step = torch.randint(-2, 3, bits0.shape, generator=g, dtype=torch.int16)
    bits1 = torch.where(torch.rand(bits0.shape, generator=g) < 0.5, bits0 + step, bits0)
    w1 = bits1.view(torch.bfloat16)
    finite = torch.isfinite(w0.float()) & torch.isfinite(w1.float())
    w0, w1 = w0[finite], w1[finite]
    rule = measures.unchanged_relative(w0.float(), w1.float(), 1e-3)  # the loader upcasts to float32
    equal = w0.float() == w1.float()  # value equality: +0 and -0 are the same stored number
    assert torch.equal(rule, equal)
    assert 0.3 < float(equal.float().mean()) < 0.95  # both outcomes well represented


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absolute_rule_matches_its_reference(dtype):
    w0 = random((10, 8), 4, dtype)
    w1 = (w0.double() + 1e-5 * random((10, 8), 5, torch.float64)).to(dtype)
    w1[3] = w0[3] + 0.5
    for atol in (1e-5, 1e-3, 0.0):
        assert int(measures.unchanged_absolute(w0, w1, atol).sum()) == ref_unchanged_absolute(w0, w1, atol)


def test_absolute_rule_compares_in_bf16_as_the_papers_code_does():
    """``torch.isclose(delta, 0, atol=1e-5)`` on bf16 tensors (Mukherjee et al.'s check_sparsity.py) compares
    against 1e-5 rounded to bf16, 1.0013580322265625e-05: a difference of exactly that is unchanged, the next
    bf16 value up is not."""
    at = torch.tensor(1e-5).to(torch.bfloat16)
    assert float(at) == 1.0013580322265625e-05
    above = (at.float() + 2.0**-24).to(torch.bfloat16)  # the next bf16 value up (one ulp at 2^-17 is 2^-24)
    assert float(above) > float(at)
    w0 = torch.zeros(3, dtype=torch.bfloat16)
    w1 = torch.stack([at, above, -at])
    official = torch.isclose(w1 - w0, torch.zeros_like(w0), atol=1e-5)  # the paper's code, verbatim
    assert official.tolist() == [True, False, True]
    assert measures.unchanged_absolute(w0, w1, 1e-5).tolist() == official.tolist()
    assert ref_unchanged_absolute(w0, w1, 1e-5) == 2


def test_elementwise_counts_in_chunks_match_the_whole(monkeypatch):
    w0, w1 = random((33, 7), 6), random((33, 7), 6)
    w1[::3] += 1.0
    mask = random((33, 7), 7) > 0.5
    monkeypatch.setattr(measures, "_CHUNK_ELEMENTS", 20)  # several chunks of rows
    counts = measures.elementwise_counts(w0, w1, mask, 1e-3, 1e-5)
    same = measures.unchanged_relative(w0, w1, 1e-3)
    assert counts.total == 231 and counts.unchanged_relative == int(same.sum())
    assert counts.unchanged_absolute == ref_unchanged_absolute(w0, w1, 1e-5)
    assert counts.mask_size == int(mask.sum()) and counts.mask_changed == int((mask & ~same).sum())


# -- numerical rank, spectral shift ---------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 1, 3, 12])
def test_numerical_rank_matches_torch_matrix_rank(rank):
    update = random((20, rank), 8) @ random((rank, 12), 9) if rank else torch.zeros(20, 12)
    s = torch.linalg.svdvals(update.double())
    assert measures.numerical_rank(s, (20, 12)) == ref_numerical_rank(update)
    assert measures.rank_fraction(s, (20, 12)) == pytest.approx(ref_numerical_rank(update) / 12)


def test_spectral_shift_matches_its_reference():
    w0 = random((15, 10), 10, torch.float64)
    w1 = w0 + 0.1 * random((15, 10), 11, torch.float64)
    s0, s1 = np.linalg.svd(w0.numpy(), compute_uv=False), np.linalg.svd(w1.numpy(), compute_uv=False)
    expected = math.sqrt(sum((b - a) ** 2 for a, b in zip(s0, s1, strict=True))) / math.sqrt(sum(a * a for a in s0))
    assert measures.spectral_shift(s0, s1) == pytest.approx(expected, rel=1e-12)
    assert measures.spectral_shift(s0, s0) == 0.0
    assert measures.spectral_shift(np.zeros(3), np.ones(3)) is None


# -- principal angles -----------------------------------------------------------------------


def test_principal_angles_match_scipy():
    a = torch.linalg.qr(random((30, 5), 12, torch.float64)).Q
    b = torch.linalg.qr(a + 0.3 * random((30, 5), 13, torch.float64)).Q
    expected = np.sort(np.degrees(subspace_angles(a.numpy(), b.numpy())))
    assert measures.principal_angles(a, b) == pytest.approx(expected, abs=1e-9)
    assert measures.principal_angles(a, a).max() < 1e-9  # identical subspaces


@pytest.mark.parametrize("degrees", [30.0, 3.0, 0.01, 1e-5])
def test_a_known_small_rotation_is_resolved(degrees):
    q = torch.linalg.qr(random((40, 40), 14, torch.float64)).Q
    base = q[:, :4]
    theta = math.radians(degrees)
    turned = base.clone()
    turned[:, 0] = math.cos(theta) * q[:, 0] + math.sin(theta) * q[:, 39]  # rank-1 change of the basis
    angles = measures.principal_angles(base, turned)
    assert angles[-1] == pytest.approx(degrees, rel=1e-7)
    assert angles[:-1].max() < 1e-10


# -- principal mask and its overlap ---------------------------------------------------------


def ref_mask(w0: np.ndarray, k: int, alpha: float) -> np.ndarray:
    u, s, vt = np.linalg.svd(w0, full_matrices=False)
    magnitude = np.abs((u[:, :k] * s[:k]) @ vt[:k])
    keep = math.ceil(alpha * magnitude.size)
    order = np.argsort(-magnitude, axis=None, kind="stable")
    mask = np.zeros(magnitude.size, dtype=bool)
    mask[order[:keep]] = True
    return mask.reshape(magnitude.shape)


def test_principal_mask_matches_its_reference_and_overlap_is_near_one_or_zero():
    w0 = random((24, 18), 15, torch.float64)
    u, s, vt = np.linalg.svd(w0.numpy(), full_matrices=False)
    mask = measures.principal_mask(torch.from_numpy(u[:, :3]), torch.from_numpy(s[:3]), torch.from_numpy(vt[:3].T), 0.1)
    assert np.array_equal(mask.numpy(), ref_mask(w0.numpy(), 3, 0.1))
    inside = w0.clone()
    inside[mask] += 0.5
    outside = w0.clone()
    outside[~mask] += 0.5
    for tuned, expected in ((inside, 1.0), (outside, 0.0)):
        counts = measures.elementwise_counts(w0, tuned, mask, 1e-3, 1e-5)
        changed = counts.total - counts.unchanged_relative
        assert measures.mask_overlap(counts.mask_changed, changed) == expected
    assert measures.mask_overlap(0, 0) is None


# -- intruder energy share, chance level ----------------------------------------------------


def test_intruder_energy_share_matches_its_reference():
    values = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    scores = np.array([0.9, 0.2, 0.95, 0.1, 0.05])
    expected = (16 + 4) / (25 + 16 + 9 + 4)
    assert measures.intruder_energy_share(values, scores, 4, 0.5) == pytest.approx(expected)
    assert measures.intruder_energy_share(values, scores, 4, 0.01) == 0.0
    assert measures.intruder_energy_share(np.zeros(3), scores, 3, 0.5) is None


def test_chance_level_matches_random_vectors_against_a_random_basis():
    median, low, high = measures.chance_level(64, 32)
    assert low < median < high
    assert measures.chance_level(64, 32) == (median, low, high)  # seeded, cached
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64)).Q[:, :32]
    x = torch.randn(64, 4000, generator=g, dtype=torch.float64)
    x /= x.norm(dim=0)
    scores = (basis.T @ x).abs().max(dim=0).values.numpy()
    assert np.median(scores) == pytest.approx(median, abs=0.01)
    assert np.percentile(scores, 95) == pytest.approx(high, abs=0.02)
