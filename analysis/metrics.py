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
    tuned_left : torch.Tensor of shape (m, k)
        The top-k tuned left singular vectors.
    base_left : torch.Tensor of shape (m, n)
        All base left singular vectors.

    Returns
    -------
    scores : ndarray of shape (k,), float64
        The best |cosine| of each tuned vector, clipped to [0, 1].
    best_match : ndarray of shape (k,), int64
        The base index attaining it.

    Examples
    --------
    A tuned vector halfway between two base axes matches each with cosine 1/sqrt(2):

    >>> import torch
    >>> base = torch.eye(3)
    >>> tuned = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2**-0.5, 2**-0.5]]).T
    >>> scores, best = intruder_scores(tuned, base)
    >>> scores.round(4).tolist(), best.tolist()
    ([1.0, 0.7071], [0, 1])
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

    Parameters
    ----------
    scores : array-like of shape (k,)
        Best-match cosines of the top-k tuned vectors.
    epsilon : float
        The threshold ``eps`` (the paper's default is 0.5).

    Returns
    -------
    int
        How many scores lie strictly below ``epsilon``.

    Examples
    --------
    >>> count_intruders([0.99, 0.42, 0.71, 0.08], 0.5)
    2
    """
    return int(np.count_nonzero(_as_numpy(scores) < epsilon))


def intruder_counts(scores: ArrayLike, epsilons: Sequence[float]) -> list[int]:
    """:func:`count_intruders` at every ``eps`` of a sweep grid.

    Examples
    --------
    >>> intruder_counts([0.99, 0.42, 0.71, 0.08], [0.1, 0.5, 0.9])
    [1, 2, 3]
    """
    return [count_intruders(scores, eps) for eps in epsilons]


def similarity_matrix(tuned_left: torch.Tensor, base_left: torch.Tensor, n: int) -> np.ndarray:
    """``|Ut[:, :n]^T U0[:, :n]|``: rows tuned rank, columns base rank.

    Shuttleworth et al. 2024, Fig. 1 and 3. ``n`` is clipped to the number of
    available columns of each side.

    Examples
    --------
    >>> import torch
    >>> similarity_matrix(torch.eye(3)[:, [1, 0, 2]], torch.eye(3), 2).tolist()
    [[0.0, 1.0], [1.0, 0.0]]
    """
    t = tuned_left[:, :n]
    b = base_left[:, :n].to(t.dtype)
    return _as_numpy((t.transpose(0, 1) @ b).abs()).astype(np.float32)


def effective_rank(singular_values: ArrayLike) -> float:
    """Effective rank (Roy & Vetterli 2007) of a matrix from its singular values.

    ``p_i = s_i / sum(s)``, ``erank = exp(-sum_i p_i ln p_i)`` over the nonzero
    singular values. Shuttleworth et al. apply it to the update ``dW``. Returns 0 for
    an all-zero matrix.

    Parameters
    ----------
    singular_values : array-like
        The singular values of the matrix (any order).

    Returns
    -------
    float
        Between 1 (rank one) and the number of nonzero values (all equal).

    Examples
    --------
    >>> effective_rank([3.0, 0.0, 0.0])
    1.0
    >>> round(effective_rank([1.0, 1.0, 1.0, 1.0]), 6)
    4.0
    >>> effective_rank([0.0, 0.0])
    0.0
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

    Examples
    --------
    >>> rank_at_variance([3.0, 0.9, 0.3], 0.9)
    1
    >>> rank_at_variance([3.0, 0.9, 0.3], 0.95)
    2
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
    """``rank90`` of Biderman et al. 2024: :func:`rank_at_variance` at 0.9.

    Examples
    --------
    >>> rank90([1.0, 1.0, 1.0, 1.0])
    4
    """
    return rank_at_variance(singular_values, 0.9)


def stable_rank(singular_values: ArrayLike) -> float:
    """Stable rank ``||dW||_F^2 / s_1^2`` (0 for an all-zero matrix).

    Examples
    --------
    >>> stable_rank([2.0, 1.0, 1.0])
    1.5
    """
    s = _as_numpy(singular_values)
    if s.size == 0 or s.max() <= 0:
        return 0.0
    return float(np.sum(s**2) / s.max() ** 2)


def frobenius_norm(singular_values: ArrayLike) -> float:
    """``||dW||_F = sqrt(sum_i s_i^2)`` from the singular values.

    Examples
    --------
    >>> frobenius_norm([3.0, 4.0])
    5.0
    """
    return float(np.sqrt(np.sum(_as_numpy(singular_values) ** 2)))


def subspace_similarity(P: torch.Tensor, Q: torch.Tensor) -> np.ndarray:
    """Normalised subspace similarity ``phi(i, j)`` for every ``i``, ``j`` at once.

    Hu et al. 2021, eq. 4: ``phi(i, j) = ||P_i^T Q_j||_F^2 / min(i, j)`` where ``P_i``
    and ``Q_j`` are the first ``i`` and ``j`` columns of two orthonormal bases (the
    top singular vectors of two updates of the same matrix). Values lie in [0, 1].

    Parameters
    ----------
    P, Q : torch.Tensor of shape (m, i) and (m, j)
        Orthonormal columns, most important first.

    Returns
    -------
    phi : ndarray of shape (P.shape[1], Q.shape[1]), float64
        ``phi[i-1, j-1] = phi(i, j)``.

    Examples
    --------
    Two bases that share their first direction and swap the next two:

    >>> import torch
    >>> phi = subspace_similarity(torch.eye(4)[:, :3], torch.eye(4)[:, [0, 2, 1]])
    >>> phi.round(3).tolist()
    [[1.0, 1.0, 1.0], [1.0, 0.5, 1.0], [1.0, 1.0, 1.0]]
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

    Parameters
    ----------
    delta_fro : float
        ``||dW||_F``.
    delta_left, delta_right : torch.Tensor of shape (out, r) and (in, r)
        The top-``r`` left and right singular vectors of ``dW``.
    base_weight : torch.Tensor of shape (out, in)
        The pre-trained weight.

    Returns
    -------
    float or None
        The factor; ``None`` for a zero update.

    Examples
    --------
    An update of norm 10 along a direction the base weight scales by 2:

    >>> import torch
    >>> u, v = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])
    >>> amplification_factor(10.0, u, v, torch.tensor([[0.0, 2.0], [1.0, 0.0]]))
    5.0
    >>> amplification_factor(0.0, u, v, torch.eye(2)) is None
    True
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
