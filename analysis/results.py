"""Results of a comparison: plain data, no torch, cheap to keep in a session.

Everything here is numpy arrays and Python scalars so that the dashboard can hold
results in ``st.session_state``, the report writer can serialise them, and figure
builders can plot them without touching the engine's devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from analysis import measures, metrics
from analysis.identity import IdentifiedMatrix, MatrixId

DEFAULT_TOP_K = 10
DEFAULT_EPSILON = 0.5
#: The eps grid of the intruder sweep (docs/metrics.md): 0.10, 0.15, ..., 0.90.
DEFAULT_EPSILONS: tuple[float, ...] = tuple(round(0.10 + 0.05 * i, 2) for i in range(17))


@dataclass
class MatrixResult(IdentifiedMatrix):
    """Every metric of docs/metrics.md for one base/tuned matrix pair.

    Vectors are stored only as far as the views need them: ``intruder_scores`` for the
    top ``len(intruder_scores)`` tuned singular vectors (so counts for any ``k`` up to
    that and any eps are exact and cheap), ``similarity`` for the top-N by top-N block,
    and the top left singular vectors of the update for subspace similarity.
    """

    id: MatrixId
    base_singular_values: np.ndarray
    tuned_singular_values: np.ndarray
    delta_singular_values: np.ndarray
    #: score_j = max_i |<Ut[:, j], U0[:, i]>| over all base vectors, j = 0..K-1.
    intruder_scores: np.ndarray
    #: argmax_i of the same, the base vector each tuned vector is closest to.
    best_match: np.ndarray
    #: |Ut[:, :N]^T U0[:, :N]|, rows tuned rank, columns base rank.
    similarity: np.ndarray
    #: Top left singular vectors of dW, ``out x R`` (float16 is enough for phi).
    delta_left_vectors: np.ndarray
    effective_rank: float
    rank90: int
    stable_rank: float
    delta_fro: float
    #: ``None`` for a zero update, where it is undefined.
    amplification_factor: float | None
    amplification_rank: int
    adapter_rank: int | None = None
    #: The stored RL-versus-SFT measures (counts, principal angles); ``None`` when the
    #: analysis ran with ``measures=False``.
    rl: measures.RlMeasures | None = None

    @property
    def spectral_shift(self) -> float | None:
        """Zhu et al. Sec. 4.1: ``||s(W1) - s(W0)|| / ||s(W0)||`` over the full spectra."""
        return measures.spectral_shift(self.base_singular_values, self.tuned_singular_values)

    @property
    def update_rank_fraction(self) -> float:
        """Mukherjee et al. Table 2: the numerical rank of ``dW`` over ``min(m, n)``."""
        return measures.rank_fraction(self.delta_singular_values, self.shape)

    def intruder_energy_share(self, k: int, eps: float) -> float | None:
        """Intruder energy share (this tool's measure): top-k ``s^2`` of ``W1`` on intruders at ``eps``."""
        return measures.intruder_energy_share(self.tuned_singular_values, self.intruder_scores, k, eps)

    @property
    def short_label(self) -> str:
        """A compact label for chart axes: ``L3 mlp_in``, ``decoder L3 cross_attn_out``, ``L3 E17 down``."""
        parts = [self.stack] if self.stack else []
        parts.append(f"L{self.layer}" if self.layer is not None else "-")
        if self.expert is not None:
            parts.append(f"E{self.expert}")
        parts.append(self.module)
        return " ".join(parts)

    def intruder_counts(self, k: int, epsilons: tuple[float, ...] | list[float]) -> list[int]:
        """Intruder counts among the top ``k`` tuned vectors at each eps (Def. 3.1).

        A matrix with fewer than ``k`` singular vectors counts among all it has.
        """
        return [metrics.count_intruders(self.intruder_scores[:k], eps) for eps in epsilons]


@dataclass
class ModelResult:
    """One fine-tune compared against the base."""

    source: str
    kind: Literal["full", "adapter"]
    matrices: list[MatrixResult] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    shape_mismatches: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    #: Every base tensor that was not analysed, as ``{"name": ..., "reason": ...}``.
    skipped: list[dict] = field(default_factory=list)
    #: The training step of a checkpoint in a series, ``None`` for a single fine-tune.
    step: int | None = None

    @property
    def label(self) -> str:
        """How the model is named in charts: its summary's ``label``, else its source."""
        return self.summary.get("label", self.source)

    def total_intruders(self, k: int, eps: float) -> int:
        """Per-model total: the sum over analysed matrices (docs/metrics.md)."""
        return sum(m.intruder_counts(k, [eps])[0] for m in self.matrices)


@dataclass
class ComparisonResult:
    """A whole comparison: the base as given, the settings, and one result per fine-tune."""

    base: str
    top_k: int
    epsilons: list[float]
    models: list[ModelResult] = field(default_factory=list)
