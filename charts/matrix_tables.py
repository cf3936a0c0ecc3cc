"""Tables of one matrix, and of two updates of one matrix.

Its spectra, its tuned vectors' best matches with the base, its similarity block, and
the subspace similarity of two updates of it.

The numbers behind :mod:`charts.spectra`'s charts, and what their "Download CSV" buttons
write. Pure functions: a :class:`MatrixResult` in, a :class:`pandas.DataFrame` (or array)
out. References: intruder dimensions, Shuttleworth et al. 2024 (arXiv:2410.21228,
Def. 3.1); subspace similarity, Hu et al. 2021 (arXiv:2106.09685, sec. 7).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from analysis import metrics
from analysis.results import MatrixResult, ModelResult
from charts.tables import adapter_rank, is_lora


def spectrum_table(matrix: MatrixResult) -> pd.DataFrame:
    """Singular values of base, tuned and update by rank (1-based; blank past the end).

    Parameters
    ----------
    matrix : MatrixResult
        One analysed matrix.

    Returns
    -------
    pandas.DataFrame
        Columns ``rank``, ``base``, ``tuned``, ``update``.
    """
    n = max(len(matrix.base_singular_values), len(matrix.tuned_singular_values), len(matrix.delta_singular_values))

    def padded(values: np.ndarray) -> np.ndarray:
        out = np.full(n, np.nan)
        out[: len(values)] = values
        return out

    return pd.DataFrame(
        {
            "rank": np.arange(1, n + 1),
            "base": padded(matrix.base_singular_values),
            "tuned": padded(matrix.tuned_singular_values),
            "update": padded(matrix.delta_singular_values),
        }
    )


def intruder_table(matrix: MatrixResult, k: int, eps: float) -> pd.DataFrame:
    """The top-``k`` tuned singular vectors: best-match score, base match, intruder flag.

    Shuttleworth et al. 2024, Def. 3.1: ``score_j = max_i |<Ut[:, j], U0[:, i]>|`` over
    all base vectors; ``Ut[:, j]`` is an intruder iff ``score_j < eps``.

    Parameters
    ----------
    matrix : MatrixResult
        One analysed matrix.
    k : int
        How many top tuned singular vectors are searched for intruders.
    eps : float
        The threshold on the best match below which a tuned vector is an intruder.

    Returns
    -------
    pandas.DataFrame
        One row per tuned vector: ``tuned_rank``, ``singular_value``, ``best_match_score``,
        ``best_match_base_rank`` and ``intruder``.
    """
    k = min(k, len(matrix.intruder_scores))
    scores = np.asarray(matrix.intruder_scores[:k], dtype=np.float64)
    return pd.DataFrame(
        {
            "tuned_rank": np.arange(1, k + 1),
            "singular_value": np.asarray(matrix.tuned_singular_values[:k], dtype=np.float64),
            "best_match_score": scores,
            "best_match_base_rank": np.asarray(matrix.best_match[:k], dtype=np.int64) + 1,
            "intruder": scores < eps,
        }
    )


def similarity_table(matrix: MatrixResult) -> pd.DataFrame:
    """``|Ut^T U0|`` as a table: rows tuned rank, columns base rank (both 1-based).

    Parameters
    ----------
    matrix : MatrixResult
        One analysed matrix.

    Returns
    -------
    pandas.DataFrame
    """
    sim = np.asarray(matrix.similarity)
    return pd.DataFrame(
        sim,
        index=pd.Index(np.arange(1, sim.shape[0] + 1), name="tuned_rank"),
        columns=[f"base_{j}" for j in range(1, sim.shape[1] + 1)],
    )


def update_rank(matrix: MatrixResult, rtol: float = 1e-5) -> int:
    """Numerical rank of ``dW``: singular values above ``rtol * s_1``.

    Singular vectors past it span no part of the update (for a rank-``r`` LoRA they are
    an arbitrary basis of the rest of the space), so subspace similarity stops there.

    Parameters
    ----------
    matrix : MatrixResult
        One analysed matrix.
    rtol : float
        Relative threshold on the singular values of ``dW``.

    Returns
    -------
    int
    """
    s = np.asarray(matrix.delta_singular_values, dtype=np.float64)
    if s.size == 0 or s[0] <= 0:
        return 0
    return int(np.count_nonzero(s > rtol * s[0]))


def subspace_similarity(a: MatrixResult, b: MatrixResult, max_dim: int = 64) -> np.ndarray:
    """``phi(i, j)`` (Hu et al. 2021, eq. 4) between two updates of the same matrix.

    Uses the left singular vectors of each ``dW`` (``delta_left_vectors``), the natural
    choice for any two updates, full or LoRA (docs/metrics.md), up to each update's numerical
    rank (:func:`update_rank`) and at most ``max_dim``. Returns an ``(i_max, j_max)``
    array with ``phi[i-1, j-1] = phi(i, j)``.

    Parameters
    ----------
    a, b : MatrixResult
        The same matrix in two analyses (the rows' and the columns' update).
    max_dim : int
        The most directions of each update compared.

    Returns
    -------
    numpy.ndarray
        ``phi``, zero-sized when either update is zero.
    """
    if a.shape != b.shape:
        raise ValueError(f"{a.name} has shape {a.shape} in one result and {b.shape} in the other")
    ia = min(max_dim, a.delta_left_vectors.shape[1], update_rank(a))
    jb = min(max_dim, b.delta_left_vectors.shape[1], update_rank(b))
    if ia == 0 or jb == 0:
        return np.zeros((ia, jb))
    P = torch.from_numpy(np.asarray(a.delta_left_vectors[:, :ia], dtype=np.float32))
    Q = torch.from_numpy(np.asarray(b.delta_left_vectors[:, :jb], dtype=np.float32))
    return metrics.subspace_similarity(P, Q)


def phi_table(phi: np.ndarray) -> pd.DataFrame:
    """``phi(i, j)`` as a table: rows ``i`` (first update), columns ``j`` (second).

    Parameters
    ----------
    phi : numpy.ndarray
        :func:`subspace_similarity`'s array.

    Returns
    -------
    pandas.DataFrame
    """
    return pd.DataFrame(
        phi,
        index=pd.Index(np.arange(1, phi.shape[0] + 1), name="i"),
        columns=[f"j_{j}" for j in range(1, phi.shape[1] + 1)],
    )


def subspace_default_pair(models: Sequence[ModelResult]) -> tuple[int, int] | None:
    """Indices of the two fine-tunes subspace similarity opens on, or ``None`` (fewer than two).

    As in Hu et al. 2021 (sec. 7.1, ``A_{r=8}`` against ``A_{r=64}``): two LoRA
    adapters of different rank, the two highest ranks when there are more; else two
    LoRA fine-tunes; else the first two fine-tunes.

    Parameters
    ----------
    models : sequence of ModelResult
        The fine-tunes, in the order they are drawn.

    Returns
    -------
    tuple of (int, int) or None
    """
    if len(models) < 2:
        return None
    ranked: dict[int, int] = {}
    for index, model in enumerate(models):
        rank = adapter_rank(model)
        if rank is not None:
            ranked.setdefault(rank, index)
    if len(ranked) >= 2:
        high, second = sorted(ranked, reverse=True)[:2]
        return ranked[second], ranked[high]
    lora = [i for i, m in enumerate(models) if is_lora(m)]
    if len(lora) >= 2:
        return lora[0], lora[1]
    return 0, 1
