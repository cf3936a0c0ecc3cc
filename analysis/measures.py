"""The weight-space measures of the RL-versus-SFT studies (issue 23), each a pure function.

Definitions are in docs/metrics.md ("RL-versus-SFT measures"), quoted from:

- Zhu et al. 2025, "The Path Not Taken: RLVR Provably Learns Off the Principals",
  arXiv:2511.08567: bf16-aware update sparsity (Sec. 2.1, Eq. 1-2), normalised spectral
  shift and principal-subspace rotation (Sec. 4.1), overlap of the update with the
  principal-weight mask (Sec. 4.2).
- Mukherjee et al. 2025, "Reinforcement Learning Finetunes Small Subnetworks in Large
  Language Models", arXiv:2505.11711: update sparsity with an absolute tolerance (Sec. 2.2),
  the numerical rank of each update (Table 2).

The intruder energy share and the chance level of an intruder score are this tool's own
measures (no paper defines them). Inputs are torch tensors or numpy arrays; outputs are
Python scalars or numpy arrays. The elementwise ones need both weights, so the pipeline
computes them while the weights are loaded (:func:`elementwise_counts`) and stores only
counts; the spectral ones follow from stored singular values and are derived when read.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

#: Zhu et al. Eq. 1: an entry is unchanged iff ``|w1 - w0| <= eta * max(|w0|, |w1|)``.
DEFAULT_ETA = 1e-3
#: Mukherjee et al. Sec. 2.2: an entry is unchanged iff ``|w1 - w0| <= 1e-5``, in bf16.
DEFAULT_ATOL = 1e-5
#: Top-k singular subspaces for the rotation and the rank-k principal mask (a setting: the
#: papers leave k to the experiment; this tool's default).
DEFAULT_PRINCIPAL_K = 16
#: The principal mask holds the top alpha fraction of entries (this tool's default).
DEFAULT_MASK_ALPHA = 0.05
RULES = ("relative", "absolute")

#: Rows per chunk of the elementwise comparison (float64 temporaries stay ~64 MiB).
_CHUNK_ELEMENTS = 1 << 23


def _f64(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``x`` in float64, on the device it is on (a GPU's weights are compared there)."""
    if not isinstance(x, torch.Tensor):  # a fresh copy: a reversed view's strides are negative
        return torch.from_numpy(np.array(x, dtype=np.float64, copy=True))
    return x.detach().to(torch.float64)


def unchanged_relative(w0: torch.Tensor, w1: torch.Tensor, eta: float = DEFAULT_ETA) -> torch.Tensor:
    """Zhu et al. Eq. 1: ``|w1 - w0| <= eta * max(|w0|, |w1|)``, elementwise, in float64.

    For bf16-stored weights (upcast exactly) and ``eta < 2^-8`` this is bitwise equality of
    the stored values: two different bf16 numbers differ by at least ``2^-8`` of the larger
    magnitude (``tests/test_measures.py`` checks it).
    """
    a, b = _f64(w0), _f64(w1)
    return (b - a).abs() <= eta * torch.maximum(a.abs(), b.abs())


def unchanged_absolute(w0: torch.Tensor, w1: torch.Tensor, atol: float = DEFAULT_ATOL) -> torch.Tensor:
    """Mukherjee et al. Sec. 2.2: ``|w1 - w0| <= atol`` with the difference computed in bf16.

    As the paper's code does it (``src/check_sparsity.py`` of SagnikMukherjee/sparsity_in_rl:
    both models loaded in bf16, ``delta = rl - sft``, ``torch.isclose(delta, 0, atol=tol)``):
    both weights rounded to bf16, subtracted in bf16 (the result rounded to bf16), and the
    comparison made in bf16 too, so against ``atol`` rounded to bf16 (1e-5 becomes
    ``1.00136e-5``: a bf16 difference of exactly that counts as unchanged).
    """
    difference = w1.detach().to(torch.bfloat16) - w0.detach().to(torch.bfloat16)
    return torch.isclose(difference, torch.zeros_like(difference), rtol=0.0, atol=atol)


def update_sparsity(unchanged: int, total: int) -> float | None:
    """Zhu et al. Eq. 2 / Mukherjee et al. Sec. 2.2: unchanged entries over all entries (``None`` for none)."""
    return unchanged / total if total else None


def numerical_rank(singular_values: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> int:
    """Mukherjee et al. Table 2: ``torch.linalg.matrix_rank``'s default tolerance on ``dW``.

    The number of singular values above ``max(m, n) * eps(float32) * s_1`` (matrix_rank's
    ``rtol`` when neither ``atol`` nor ``rtol`` is given, for a float32 update); 0 for a zero
    update.
    """
    s = _f64(singular_values)
    if s.numel() == 0 or float(s.max()) == 0.0:
        return 0
    tolerance = max(shape) * torch.finfo(torch.float32).eps * float(s.max())
    return int((s > tolerance).sum())


def rank_fraction(singular_values: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> float:
    """:func:`numerical_rank` as a fraction of ``min(m, n)``."""
    return numerical_rank(singular_values, shape) / min(shape)


def spectral_shift(base_values: np.ndarray | torch.Tensor, tuned_values: np.ndarray | torch.Tensor) -> float | None:
    """Zhu et al. Sec. 4.1: ``||s(W1) - s(W0)||_2 / ||s(W0)||_2`` over the full spectra (``None`` for ``W0 = 0``)."""
    s0, s1 = _f64(base_values), _f64(tuned_values)
    norm = float(torch.linalg.vector_norm(s0))
    return float(torch.linalg.vector_norm(s1 - s0)) / norm if norm > 0 else None


def principal_angles(q0: torch.Tensor, q1: torch.Tensor) -> np.ndarray:
    """Principal angles between ``span(q0)`` and ``span(q1)`` in degrees, ascending (Zhu et al. Sec. 4.1).

    ``cos theta_i = s_i(Q0^T Q1)`` for orthonormal bases. Arccos of a cosine near 1 loses
    half the digits (an angle of 1e-4 rad has ``cos = 1 - 5e-9``), so small angles come from
    their sines, the singular values of ``Q1 - Q0 Q0^T Q1`` (Knyazev & Argentati 2002): in
    float64 an angle is resolved to about 1e-12 degrees plus the error of the vectors.
    Both bases are re-orthonormalised (QR, float64) first.
    """
    a = torch.linalg.qr(_f64(q0)).Q
    b = torch.linalg.qr(_f64(q1)).Q
    cross = a.transpose(0, 1) @ b
    cosines = torch.linalg.svdvals(cross).clamp(0.0, 1.0)  # descending: angles ascending
    sines = torch.linalg.svdvals(b - a @ cross).clamp(0.0, 1.0).flip(0)  # ascending
    from_cos = torch.arccos(cosines)
    from_sin = torch.arcsin(sines)
    angles = torch.where(from_cos < math.pi / 4, from_sin, from_cos)
    return np.degrees(angles.cpu().numpy())


def principal_mask(base_left: torch.Tensor, base_values: torch.Tensor, base_right: torch.Tensor, alpha: float):
    """Zhu et al. Sec. 4.2: the top ``alpha`` fraction of entries of ``|U0k S0k V0k^T|``.

    ``ceil(alpha * m n)`` entries: those at or above that entry's magnitude (ties, rare
    for floats, all count). Returns a boolean ``m x n`` tensor.
    """
    reconstruction = ((_f64(base_left) * _f64(base_values)) @ _f64(base_right).transpose(0, 1)).abs_()
    size = reconstruction.numel()
    keep = min(size, max(1, math.ceil(alpha * size)))
    threshold = torch.kthvalue(reconstruction.reshape(-1), size - keep + 1).values
    return reconstruction >= threshold


def mask_overlap(in_mask_and_changed: int, changed: int) -> float | None:
    """Zhu et al. Sec. 4.2: ``|M_princ n M_changed| / |M_changed|`` (random baseline: alpha).

    ``None`` when nothing changed.
    """
    return in_mask_and_changed / changed if changed else None


def intruder_energy_share(tuned_values: np.ndarray, scores: np.ndarray, k: int, epsilon: float) -> float | None:
    """Intruder energy share (this tool's measure): of the top-k ``s_j^2`` of ``W1``, the share on intruders.

    ``sum_{j<k, score_j < eps} s_j^2 / sum_{j<k} s_j^2``; ``None`` for a zero weight.
    """
    k = min(k, len(scores), len(tuned_values))
    energy = np.asarray(tuned_values[:k], dtype=np.float64) ** 2
    total = float(energy.sum())
    return float(energy[np.asarray(scores[:k]) < epsilon].sum()) / total if total > 0 else None


@dataclass(frozen=True)
class ElementCounts:
    """What the elementwise measures keep of one matrix pair: counts only."""

    total: int
    unchanged_relative: int
    unchanged_absolute: int
    #: ``|M_princ|`` and ``|M_princ n M_changed|`` (``M_changed`` by the relative rule).
    mask_size: int
    mask_changed: int


def elementwise_counts(
    w0: torch.Tensor, w1: torch.Tensor, mask: torch.Tensor | None, eta: float, atol: float
) -> ElementCounts:
    """Both unchanged counts and the principal-mask overlap of one pair, chunk by chunk of rows."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, w0.shape[-1]))
    relative = absolute = in_mask = changed_in_mask = 0
    for start in range(0, w0.shape[0], rows):
        a, b = w0[start : start + rows], w1[start : start + rows]
        same = unchanged_relative(a, b, eta)
        relative += int(same.sum())
        absolute += int(unchanged_absolute(a, b, atol).sum())
        if mask is not None:
            part = mask[start : start + rows]
            in_mask += int(part.sum())
            changed_in_mask += int((part & ~same).sum())
    return ElementCounts(w0.numel(), relative, absolute, in_mask, changed_in_mask)


@dataclass(frozen=True, eq=False)
class RlMeasures:
    """The stored measures of one pair (counts, angles) and the settings they were made with."""

    counts: ElementCounts
    #: Principal angles (degrees, ascending) between the top-k left / right singular
    #: subspaces of W0 and W1 (Zhu et al. Sec. 4.1).
    angles_left: np.ndarray
    angles_right: np.ndarray
    k: int
    alpha: float
    eta: float
    atol: float

    def __eq__(self, other: object) -> bool:
        """Equal counts, settings and angles (arrays compared elementwise)."""
        if not isinstance(other, RlMeasures):
            return NotImplemented
        same = (self.counts, self.k, self.alpha, self.eta, self.atol) == (
            other.counts, other.k, other.alpha, other.eta, other.atol
        )  # fmt: skip
        return same and all(
            np.array_equal(a, b)
            for a, b in ((self.angles_left, other.angles_left), (self.angles_right, other.angles_right))
        )

    __hash__ = None  # type: ignore[assignment]

    def sparsity(self, rule: str = "relative") -> float | None:
        """Unchanged entries over all entries by ``rule`` (``relative``: Zhu Eq. 1; ``absolute``: Mukherjee)."""
        unchanged = self.counts.unchanged_relative if rule == "relative" else self.counts.unchanged_absolute
        return update_sparsity(unchanged, self.counts.total)

    @property
    def changed(self) -> int:
        """Entries changed by the relative rule (``M_changed`` of the mask overlap)."""
        return self.counts.total - self.counts.unchanged_relative

    @property
    def mask_overlap(self) -> float | None:
        """``|M_princ n M_changed| / |M_changed|`` (baseline: ``alpha``); ``None`` when nothing changed."""
        return mask_overlap(self.counts.mask_changed, self.changed)

    @property
    def max_angle(self) -> float:
        """The largest principal angle of either side, in degrees."""
        return float(max(self.angles_left.max(initial=0.0), self.angles_right.max(initial=0.0)))


#: Random unit vectors drawn per shape for :func:`chance_level`.
CHANCE_SAMPLES = 2000


@functools.lru_cache(maxsize=256)
def chance_level(
    rows: int, base_vectors: int, samples: int = CHANCE_SAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """The largest ``|cos|`` a random unit vector reaches against ``base_vectors`` orthonormal ones in R^rows.

    By rotation invariance the base may be the first ``base_vectors`` coordinate axes, so
    the score of a random unit vector ``x`` is ``max_{i < r} |x_i|``. A seeded simulation of
    ``samples`` vectors; returns (median, 5th percentile, 95th percentile), cached per shape.
    An intruder count at an eps below the 5th percentile counts almost any direction.
    """
    generator = np.random.default_rng(seed)
    scores = np.empty(samples)
    batch = max(1, (1 << 22) // max(rows, 1))
    for start in range(0, samples, batch):
        x = generator.standard_normal((min(batch, samples - start), rows))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        scores[start : start + x.shape[0]] = np.abs(x[:, :base_vectors]).max(axis=1)
    low, median, high = np.percentile(scores, [5, 50, 95])
    return float(median), float(low), float(high)
