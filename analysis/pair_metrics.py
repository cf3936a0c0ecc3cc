"""One matrix pair's metrics, as the papers define them, and the result read back.

:func:`pair_metrics` computes what a pair's cache entry holds from the spectra of the
base, the tuned weight and the update; :func:`matrix_result` turns such an entry into a
:class:`~analysis.results.MatrixResult`, deriving the metrics that follow from the
update's singular values. :class:`AnalysisSettings` says how much of each is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from analysis import measures as measures_module
from analysis import metrics
from analysis.cache import Entry
from analysis.errors import InputError
from analysis.linalg import Spectrum
from analysis.plan import MatrixPlan
from analysis.results import MatrixResult


@dataclass(frozen=True)
class AnalysisSettings:
    """What is kept per matrix; part of every pair's cache key.

    ``max_top_k`` tuned vectors are scored for intruders (any ``k`` up to it can then be
    shown without recomputation); ``similarity_size`` is N of the ``N x N`` similarity
    block; ``delta_vectors`` left singular vectors of the update are kept for subspace
    similarity; ``side`` picks left (default, docs/metrics.md) or right singular vectors.
    """

    max_top_k: int = 100
    similarity_size: int = 100
    delta_vectors: int = 64
    side: Literal["left", "right"] = "left"
    #: The RL-versus-SFT measures (issue 23, docs/metrics.md), stored in their own cache
    #: entry (:mod:`analysis.update_measures`); ``measures=False`` skips them.
    measures: bool = True
    #: Zhu et al. Eq. 1's eta (relative rule) and Mukherjee et al.'s absolute tolerance.
    sparsity_eta: float = measures_module.DEFAULT_ETA
    sparsity_atol: float = measures_module.DEFAULT_ATOL
    #: Which rule the headline sparsity uses (both are always stored).
    sparsity_rule: Literal["relative", "absolute"] = "relative"
    #: k of the principal subspaces (rotation) and of W0's rank-k reconstruction (mask).
    principal_k: int = measures_module.DEFAULT_PRINCIPAL_K
    #: The principal mask's fraction of entries.
    mask_alpha: float = measures_module.DEFAULT_MASK_ALPHA

    def signature(self) -> str:
        """The pair entry's settings as ``name=value`` pairs in name order (for its cache key).

        Only the fields the pair entry depends on: the measures' settings have an entry
        (and :meth:`measure_signature`) of their own, so adding them kept every pair key.
        """
        return ",".join(f"{k}={v}" for k, v in sorted(asdict(self).items()) if k in PAIR_FIELDS)

    def measure_signature(self) -> str:
        """The settings the ``measures`` entry depends on (for its cache key)."""
        fields = ("side", "sparsity_eta", "sparsity_atol", "principal_k", "mask_alpha")
        return ",".join(f"{k}={getattr(self, k)!r}" for k in fields)


#: The settings a pair entry depends on (its cache key, :meth:`AnalysisSettings.signature`).
PAIR_FIELDS = ("max_top_k", "similarity_size", "delta_vectors", "side")


def settings_for(top_k: int) -> AnalysisSettings:
    """The :class:`AnalysisSettings` a comparison analyses with for ``top_k``.

    Part of every pair's cache key, so whatever analyses with these settings (the command
    line, :func:`analysis.compare.compare`, its Ray runner, :class:`analysis.training.SpectrumCallback`)
    shares the cache entries.
    """
    return AnalysisSettings(max_top_k=max(top_k, AnalysisSettings.max_top_k))


def checked_settings(top_k: int, epsilons: Sequence[float], settings: AnalysisSettings | None) -> AnalysisSettings:
    """``settings`` (default :func:`settings_for`), after checking ``top_k`` and ``epsilons`` against them.

    Raises
    ------
    InputError
        ``top_k`` outside ``[1, settings.max_top_k]`` or an eps outside ``(0, 1]``.
    """
    settings = settings or settings_for(top_k)
    check_measure_settings(settings)
    if not 1 <= top_k <= settings.max_top_k:
        raise InputError("--top-k", f"must be between 1 and {settings.max_top_k}, got {top_k}")
    if any(not 0 < eps <= 1 for eps in epsilons):
        raise InputError("--epsilons", f"every eps must lie in (0, 1], got {list(epsilons)}")
    return settings


def check_measure_settings(settings: AnalysisSettings) -> None:
    """Refuse measure settings outside their range, one plain line each.

    Raises
    ------
    InputError
        eta not in ``[0, 1)``, a negative tolerance, an unknown rule, ``k < 1`` or alpha
        not in ``(0, 1]``.
    """
    if not 0 <= settings.sparsity_eta < 1:
        raise InputError("--sparsity-eta", f"must lie in [0, 1), got {settings.sparsity_eta}")
    if not settings.sparsity_atol >= 0:
        raise InputError("--sparsity-atol", f"must be 0 or more, got {settings.sparsity_atol}")
    if settings.sparsity_rule not in measures_module.RULES:
        raise InputError("--sparsity-rule", f"use one of {', '.join(measures_module.RULES)}")
    if settings.principal_k < 1:
        raise InputError("--principal-k", f"must be 1 or more, got {settings.principal_k}")
    if not 0 < settings.mask_alpha <= 1:
        raise InputError("--mask-alpha", f"must lie in (0, 1], got {settings.mask_alpha}")


def pair_metrics(
    base: torch.Tensor,
    base_spectrum: Spectrum,
    tuned_spectrum: Spectrum,
    delta: Spectrum,
    settings: AnalysisSettings,
    adapter_rank: int | None,
) -> Entry:
    """The metrics of DESIGN.md for one matrix pair, as the papers define them.

    From ``W0 = U0 S0 V0^T`` (the base's spectrum, every left vector), ``Wt = Ut St Vt^T``
    (the tuned weight's, top vectors) and ``dW = Wt - W0`` (the update's).

    Returns the entry the cache stores: spectra, intruder scores, the similarity block, the
    update's top vectors and the amplification factor; the update's scalar metrics are
    derived from its values whenever the entry is read (:func:`matrix_result`).
    """
    # Shuttleworth et al. 2024, Def. 3.1: top-k tuned left vectors against every base one.
    U0 = base_spectrum.left().float()
    k = min(settings.max_top_k, tuned_spectrum.rank_bound)
    Ut = tuned_spectrum.left(max(k, settings.similarity_size)).float()
    scores, best_match = metrics.intruder_scores(Ut[:, :k], U0)
    similarity = metrics.similarity_matrix(Ut, U0, settings.similarity_size)
    del U0, Ut

    Sd = delta.values.double()
    update = metrics.update_metrics(Sd)  # derived again when read (matrix_result), never stored
    delta_fro, rank90 = update["delta_fro"], update["rank90"]
    # Hu et al. 7.3 take r = the adapter's rank; a full fine-tune has none, so use the
    # rank that explains 90% of its update (Biderman et al.).
    amp_rank = min(adapter_rank or rank90, int(torch.count_nonzero(Sd)))
    amplification = metrics.amplification_factor(
        delta_fro, delta.left(amp_rank).float(), delta.right(amp_rank).float(), base
    )

    tensors = {
        "base_s": base_spectrum.values,
        "tuned_s": tuned_spectrum.values.float(),
        "delta_s": Sd,  # float64: the update's metrics are derived from it when read
        "scores": torch.from_numpy(scores.astype(np.float32)),
        "best_match": torch.from_numpy(best_match),
        "similarity": torch.from_numpy(similarity),
        "delta_u": delta.left(settings.delta_vectors).to(torch.float16),
    }
    # Only what needs the vectors is stored beside the spectra; see matrix_result.
    info = {"amplification_factor": amplification, "amplification_rank": amp_rank}
    return {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, info


def matrix_result(
    plan: MatrixPlan, tensors: dict[str, torch.Tensor], info: dict, rl: measures_module.RlMeasures | None = None
) -> MatrixResult:
    """A pair's result from its entry.

    The stored spectra and scores, and the metrics that follow from the update's singular
    values (:func:`analysis.metrics.update_metrics`) derived here, so that a changed or
    added metric needs no recomputation.
    """
    arrays = {name: t.numpy() for name, t in tensors.items()}
    stored = {name: info[name] for name in ("amplification_factor", "amplification_rank")}
    return MatrixResult(
        id=plan.id,
        base_singular_values=arrays["base_s"],
        tuned_singular_values=arrays["tuned_s"],
        delta_singular_values=arrays["delta_s"],
        intruder_scores=arrays["scores"].astype(np.float64),
        best_match=arrays["best_match"],
        similarity=arrays["similarity"],
        delta_left_vectors=arrays["delta_u"],
        adapter_rank=plan.adapter_rank,
        rl=rl,
        **metrics.update_metrics(arrays["delta_s"]),
        **stored,
    )
