"""The metrics of docs/metrics.md, each a pure function in exactly one place.

Inputs are torch tensors (any float dtype, any device) or numpy arrays of singular
values; outputs are Python scalars or numpy arrays. Nothing here loads files, caches,
or chooses devices: the pipeline does that around these functions.

References
----------
- Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
  arXiv:2410.21228 (intruder dimensions, Def. 3.1 / Algorithm 1; similarity matrix,
  Fig. 1 and 3).
- Biderman et al. 2024, "LoRA Learns Less and Forgets Less", arXiv:2405.09673
  (rank needed to explain 90% of the variance of the update).
- Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality".
- Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
  arXiv:2106.09685, section 7 (subspace similarity eq. 4; amplification factor 7.3).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def intruder_scores(tuned_left: torch.Tensor, base_left: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Best-match cosine of each tuned singular vector against every base one.

    Shuttleworth et al. 2024, Def. 3.1 / Algorithm 1: for each tuned left singular
    vector ``Ut[:, j]`` (columns of ``tuned_left``, typically the top ``k``),
    ``score_j = max_i |<Ut[:, j], U0[:, i]>|`` over **all** columns ``i`` of
    ``base_left``. Singular vectors are unit-norm, so the inner product is the cosine.

    Parameters
    ----------
    tuned_left : (m, k) tensor, the top-k tuned left singular vectors.
    base_left : (m, n) tensor, all base left singular vectors.

    Returns
    -------
    scores : (k,) float64 array, the best |cosine| of each tuned vector, clipped to [0, 1].
    best_match : (k,) int64 array, the base index attaining it.
    """
    sims = (tuned_left.transpose(0, 1) @ base_left.to(tuned_left.dtype)).abs()
    best, idx = sims.max(dim=1)
    # A cosine of unit vectors lies in [0, 1]; float round-off (and float16 base vectors)
    # can push it a hair above 1.
    best = best.clamp(max=1.0)
    return _as_numpy(best), idx.cpu().numpy().astype(np.int64)


def count_intruders(scores: ArrayLike, epsilon: float) -> int:
    """Number of intruder dimensions: vectors whose best match is below ``epsilon``.

    Shuttleworth et al. 2024, Def. 3.1: ``Ut[:, j]`` is an intruder at threshold
    ``eps`` iff ``max_i |<Ut[:, j], U0[:, i]>| < eps``. ``scores`` are the outputs of
    :func:`intruder_scores` for the top-k tuned vectors.
    """
    return int(np.count_nonzero(_as_numpy(scores) < epsilon))


def intruder_counts(scores: ArrayLike, epsilons: Sequence[float]) -> list[int]:
    """:func:`count_intruders` at every ``eps`` of a sweep grid."""
    return [count_intruders(scores, eps) for eps in epsilons]


def similarity_matrix(tuned_left: torch.Tensor, base_left: torch.Tensor, n: int) -> np.ndarray:
    """``|Ut[:, :n]^T U0[:, :n]|``: rows tuned rank, columns base rank.

    Shuttleworth et al. 2024, Fig. 1 and 3. ``n`` is clipped to the number of
    available columns of each side.
    """
    t = tuned_left[:, :n]
    b = base_left[:, :n].to(t.dtype)
    return _as_numpy((t.transpose(0, 1) @ b).abs()).astype(np.float32)


def effective_rank(singular_values: ArrayLike) -> float:
    """Effective rank (Roy & Vetterli 2007) of a matrix from its singular values.

    ``p_i = s_i / sum(s)``, ``erank = exp(-sum_i p_i ln p_i)`` over the nonzero
    singular values. Shuttleworth et al. apply it to the update ``dW``. Returns 0 for
    an all-zero matrix.
    """
    s = _as_numpy(singular_values)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def rank_at_variance(singular_values: ArrayLike, fraction: float = 0.9) -> int:
    """Smallest ``r`` with ``sum_{i<=r} s_i^2 >= fraction * sum_i s_i^2``.

    Biderman et al. 2024 (rank needed to explain 90% of the variance of the update;
    ``rank90`` with the default ``fraction``). Singular values must be in descending
    order. Returns 0 for an all-zero matrix.
    """
    energy = _as_numpy(singular_values) ** 2
    total = energy.sum()
    if total <= 0:
        return 0
    cumulative = np.cumsum(energy)
    # A relative tolerance keeps round-off from pushing an exactly-met threshold one
    # rank further (e.g. a rank-r update whose top r values hold exactly 90%).
    return int(np.searchsorted(cumulative, fraction * total * (1 - 1e-12), side="left") + 1)


def rank90(singular_values: ArrayLike) -> int:
    """``rank90`` of Biderman et al. 2024: :func:`rank_at_variance` at 0.9."""
    return rank_at_variance(singular_values, 0.9)


def stable_rank(singular_values: ArrayLike) -> float:
    """Stable rank ``||dW||_F^2 / s_1^2`` (0 for an all-zero matrix)."""
    s = _as_numpy(singular_values)
    if s.size == 0 or s.max() <= 0:
        return 0.0
    return float(np.sum(s**2) / s.max() ** 2)


def frobenius_norm(singular_values: ArrayLike) -> float:
    """``||dW||_F = sqrt(sum_i s_i^2)`` from the singular values."""
    return float(np.sqrt(np.sum(_as_numpy(singular_values) ** 2)))


def subspace_similarity(P: torch.Tensor, Q: torch.Tensor) -> np.ndarray:
    """Normalised subspace similarity ``phi(i, j)`` for every ``i``, ``j`` at once.

    Hu et al. 2021, eq. 4: ``phi(i, j) = ||P_i^T Q_j||_F^2 / min(i, j)`` where ``P_i``
    and ``Q_j`` are the first ``i`` and ``j`` columns of two orthonormal bases (the
    top singular vectors of two updates of the same matrix). Values lie in [0, 1].

    Returns
    -------
    phi : (P.shape[1], Q.shape[1]) float64 array with ``phi[i-1, j-1] = phi(i, j)``.
    """
    m = (P.transpose(0, 1) @ Q.to(P.dtype)).to(torch.float64) ** 2
    overlap = m.cumsum(0).cumsum(1)
    i = torch.arange(1, m.shape[0] + 1, dtype=torch.float64, device=m.device)[:, None]
    j = torch.arange(1, m.shape[1] + 1, dtype=torch.float64, device=m.device)[None, :]
    return _as_numpy(overlap / torch.minimum(i, j))


def amplification_factor(
    delta_fro: float, delta_left: torch.Tensor, delta_right: torch.Tensor, base_weight: torch.Tensor
) -> float | None:
    """Amplification factor of an update (Hu et al. 2021, section 7.3).

    ``||dW||_F / ||U^T W_base V||_F`` where ``U`` (``out x r``) and ``V`` (``in x r``)
    are the top-``r`` left and right singular vectors of ``dW``. Large values mean the
    update amplifies directions that the pre-trained weight barely uses. Returns
    ``inf`` when ``W_base`` has no energy in those directions and ``dW != 0``, and
    ``None`` for a zero update, where it is undefined (0 / 0: there are no directions).
    """
    if delta_fro == 0:
        return None
    dtype = torch.promote_types(delta_left.dtype, delta_right.dtype)
    projected = delta_left.to(dtype).transpose(0, 1) @ base_weight.to(dtype) @ delta_right.to(dtype)
    denominator = float(torch.linalg.matrix_norm(projected.to(torch.float64), ord="fro"))
    return float("inf") if denominator == 0 else float(delta_fro / denominator)


#: The scalar metrics of an update ``dW`` that follow from its singular values alone. They
#: are derived whenever a result is read (:func:`update_metrics`), never stored: the cache
#: keeps the spectrum, so a metric added here or changed reuses every cached entry.
UPDATE_METRICS = {
    "effective_rank": effective_rank,
    "rank90": rank90,
    "stable_rank": stable_rank,
    "delta_fro": frobenius_norm,
}


def update_metrics(singular_values: ArrayLike) -> dict[str, float | int]:
    """Every metric of :data:`UPDATE_METRICS` from the update's singular values (float64)."""
    s = _as_numpy(singular_values).astype(np.float64)
    return {name: metric(s) for name, metric in UPDATE_METRICS.items()}
