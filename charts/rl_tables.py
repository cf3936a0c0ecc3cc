"""Tables of the RL-versus-SFT measures (issue 23): results in, :class:`pandas.DataFrame` out.

The measures themselves are defined in docs/metrics.md ("RL-versus-SFT measures") and
computed by the engine (:mod:`analysis.measures`); this module only arranges them: a table
in the shape of Zhu et al. 2025 Table 1 (:func:`sparsity_table`), one value per matrix for
the overview's grids and the series' lines (:func:`rl_value`), a matrix's principal angles
(:func:`angles_table`) and the chance level of intruder scores (:func:`chance_table`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis import chance
from analysis.cache import SpectrumCache
from analysis.results import MatrixResult, ModelResult
from charts.tables import model_labels, training_method

#: The per-matrix measures a grid or a line can show, with their display names.
RL_METRICS: dict[str, str] = {
    "update_sparsity": "Update sparsity (Zhu Eq. 1)",
    "update_sparsity_absolute": "Update sparsity (|ΔW| ≤ atol, bf16)",
    "principal_angle_max": "Largest principal angle (°)",
    "spectral_shift": "Spectral shift ‖Δs‖/‖s₀‖",
    "mask_overlap": "Principal-mask overlap",
    "update_rank_fraction": "Numerical rank of ΔW / min(m, n)",
    "intruder_energy_share": "Intruder energy share",
}

#: What each measure says about one matrix, in a sentence (under a grid coloured by it).
RL_MEANINGS: dict[str, str] = {
    "update_sparsity": "the share of the matrix's entries left unchanged, |w₁ − w₀| ≤ η·max(|w₀|, |w₁|) with "
    "η = 1e-3 by default (Zhu et al. 2025 Eq. 1; for bf16 weights, bitwise equality)",
    "update_sparsity_absolute": "the share of the matrix's entries with |ΔW| ≤ atol (1e-5 by default), the "
    "difference computed in bf16 (Mukherjee et al. 2025)",
    "principal_angle_max": "the largest principal angle, in degrees, between the top-k left or right singular "
    "subspaces of W₀ and W₁ (Zhu et al. 2025 Sec. 4.1): how far the principal directions turned",
    "spectral_shift": "‖s(W₁) − s(W₀)‖ / ‖s(W₀)‖ over the full spectra (Zhu et al. 2025 Sec. 4.1): how far the "
    "singular values moved",
    "mask_overlap": "the share of the changed entries that lie in W₀'s principal mask, the top-α entries of its "
    "rank-k reconstruction (Zhu et al. 2025 Sec. 4.2); α is what chance gives",
    "update_rank_fraction": "the numerical rank of ΔW (torch.linalg.matrix_rank's default tolerance) over "
    "min(m, n) (Mukherjee et al. 2025 Table 2); a LoRA's is at most r / min(m, n)",
    "intruder_energy_share": "of the top-k singular values of W₁, the share of Σ s² on intruder directions at ε "
    "(this tool's measure: a count saturates, the share does not)",
}


def rl_value(matrix: MatrixResult, metric: str, k: int, eps: float) -> float:
    """One matrix's value of an :data:`RL_METRICS` measure (NaN where it is undefined or not computed)."""
    if metric == "spectral_shift":
        value = matrix.spectral_shift
    elif metric == "update_rank_fraction":
        value = matrix.update_rank_fraction
    elif metric == "intruder_energy_share":
        value = matrix.intruder_energy_share(k, eps)
    elif matrix.rl is None:
        value = None
    elif metric == "update_sparsity":
        value = matrix.rl.sparsity("relative")
    elif metric == "update_sparsity_absolute":
        value = matrix.rl.sparsity("absolute")
    elif metric == "principal_angle_max":
        value = matrix.rl.max_angle
    elif metric == "mask_overlap":
        value = matrix.rl.mask_overlap
    else:
        raise ValueError(f"metric must be one of {sorted(RL_METRICS)}, got {metric!r}")
    return math.nan if value is None else float(value)


def group_value(matrices: Sequence[MatrixResult], metric: str, k: int, eps: float) -> float:
    """A group's value of a measure (a layer, a module, a whole model): the parts taken together.

    Sparsity: unchanged entries over all entries of the group; mask overlap: changed entries
    in the masks over all changed entries; largest principal angle: the largest; intruder
    energy share: intruder energy over all top-k energy; the others: the mean over matrices.
    NaN when no matrix has the measure.
    """
    with_rl = [m.rl for m in matrices if m.rl is not None]
    if metric in ("update_sparsity", "update_sparsity_absolute", "mask_overlap", "principal_angle_max"):
        if not with_rl:
            return math.nan
        if metric == "principal_angle_max":
            return max(r.max_angle for r in with_rl)
        if metric == "mask_overlap":
            changed = sum(r.changed for r in with_rl)
            return sum(r.counts.mask_changed for r in with_rl) / changed if changed else math.nan
        field = "unchanged_relative" if metric == "update_sparsity" else "unchanged_absolute"
        return sum(getattr(r.counts, field) for r in with_rl) / sum(r.counts.total for r in with_rl)
    if metric == "intruder_energy_share":
        shares = [_energy(m, k, eps) for m in matrices]
        total = sum(d for _, d in shares)
        return sum(n for n, _ in shares) / total if total > 0 else math.nan
    values = [rl_value(m, metric, k, eps) for m in matrices]
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _energy(matrix: MatrixResult, k: int, eps: float) -> tuple[float, float]:
    """(intruder energy, all energy) of the top-k ``s^2`` of ``W1``."""
    top = min(k, len(matrix.intruder_scores), len(matrix.tuned_singular_values))
    energy = np.asarray(matrix.tuned_singular_values[:top], dtype=np.float64) ** 2
    return float(energy[np.asarray(matrix.intruder_scores[:top]) < eps].sum()), float(energy.sum())


def _percent(value: float | None) -> float | None:
    """A share in %, as computed.

    Not rounded: the CSV keeps it whole; a table shows it with :data:`charts.table_words.MEASURES`' digits.
    """
    return None if value is None else 100.0 * value


def sparsity_table(models: Sequence[ModelResult], base_label: str, k: int, eps: float) -> pd.DataFrame:
    """One row per fine-tune, in the shape of Zhu et al. 2025 Table 1, plus the other measures.

    ``sparsity_pct`` is Zhu et al.'s Eq. 1 rule and ``sparsity_abs_pct`` Mukherjee et al.'s,
    both over ``counts`` (every comparable parameter for a full fine-tune, 1-D ones included;
    the analysed matrices otherwise, as the column says). The other columns summarise the
    matrices: median spectral shift, largest principal angle, mean mask overlap (against its
    baseline alpha), median rank fraction of the update, intruder energy share of all
    matrices' top-k energy at ``eps``.
    """
    rows = []
    for label, model in zip(model_labels(models), models, strict=True):
        with_rl = [m.rl for m in model.matrices if m.rl is not None]
        whole = model.summary.get("whole_model_sparsity")
        if whole:
            relative, absolute = whole["sparsity_relative"], whole["sparsity_absolute"]
            counted = f"{whole['parameters']:,} parameters: every comparable one, 1-D included"
        elif with_rl:
            total = sum(r.counts.total for r in with_rl)
            relative = sum(r.counts.unchanged_relative for r in with_rl) / total
            absolute = sum(r.counts.unchanged_absolute for r in with_rl) / total
            what = "adapted matrices (merged update)" if model.kind == "adapter" else "analysed matrices only"
            counted = f"{total:,} parameters: the {len(with_rl)} {what}"
        else:
            relative = absolute = None
            counted = "not computed"
        overlaps = [r.mask_overlap for r in with_rl if r.mask_overlap is not None]
        shares = [_energy(m, k, eps) for m in model.matrices]
        share_num, share_den = sum(n for n, _ in shares), sum(d for _, d in shares)
        rows.append(
            {
                "fine_tune": label,
                "method": training_method(model),
                "sparsity_pct": _percent(relative),
                "sparsity_abs_pct": _percent(absolute),
                "counts": counted,
                "median_spectral_shift": _median([m.spectral_shift for m in model.matrices]),
                "max_principal_angle_deg": max((r.max_angle for r in with_rl), default=None),
                "mean_mask_overlap": float(np.mean(overlaps)) if overlaps else None,
                "mask_alpha": with_rl[0].alpha if with_rl else None,
                "median_update_rank_fraction": _median([m.update_rank_fraction for m in model.matrices]),
                "intruder_energy_share": share_num / share_den if share_den > 0 else None,
                "base": base_label,  # last: the same in every row (a phone shows the numbers first)
            }
        )
    return pd.DataFrame(rows)


def counted_notes(models: Sequence[ModelResult]) -> list[str]:
    """What each fine-tune's update sparsity counts, in the command line report's words (one line each).

    A full fine-tune's whole-model figure says which parameters it counts (``counts`` of
    :func:`analysis.model_sparsity.whole_model_sparsity`); an adapter's counts its adapted
    matrices, the merged update ``W0 + BA`` of each, as the command line's report does
    (an adapter's whole model is not counted there either).
    """
    notes = []
    for label, model in zip(model_labels(models), models, strict=True):
        whole = model.summary.get("whole_model_sparsity")
        with_rl = [m.rl for m in model.matrices if m.rl is not None]
        if whole:
            notes.append(f"{label}: {whole['counts']}.")
        elif not with_rl:
            notes.append(f"{label}: not computed (the measures are off).")
        elif model.kind == "adapter":
            notes.append(
                f"{label}: the {len(with_rl)} matrices the adapter changes only, each as its merged update "
                "(W₀ + scale·BA); an adapter's whole model is not counted, as in the command line's report "
                "(its other tensors are the base's own)."
            )
        else:
            notes.append(
                f"{label}: the {len(with_rl)} analysed matrices only (the whole-model count, every comparable "
                "parameter, is added when the analysis has finished)."
            )
    return notes


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.median(kept)) if kept else None


def angles_table(matrix: MatrixResult) -> pd.DataFrame:
    """A matrix's principal angles (degrees), ``i = 1..k``, left and right singular subspaces."""
    if matrix.rl is None:
        return pd.DataFrame(columns=["i", "left_deg", "right_deg"])
    rl = matrix.rl
    n = max(len(rl.angles_left), len(rl.angles_right))
    pad = lambda a: np.concatenate([a, np.full(n - len(a), np.nan)])  # noqa: E731
    return pd.DataFrame({"i": np.arange(1, n + 1), "left_deg": pad(rl.angles_left), "right_deg": pad(rl.angles_right)})


def chance_table(models: Sequence[ModelResult], cache: SpectrumCache | None = None) -> pd.DataFrame:
    """The chance level of an intruder score for each matrix shape analysed (:func:`analysis.measures.chance_level`).

    A random unit vector's best ``|cos|`` against the ``min(m, n)`` base left singular
    vectors in ``R^m``: median and 5-95% band of a seeded simulation, per shape, read from
    ``cache`` when stored there (:func:`analysis.chance.chance_level`).
    """
    shapes = sorted({(m.shape[0], min(m.shape)) for model in models for m in model.matrices})
    rows = []
    for rows_m, vectors in shapes:
        median, low, high = chance.chance_level(rows_m, vectors, cache=cache)
        rows.append({"rows": rows_m, "base_vectors": vectors, "median": median, "p5": low, "p95": high})
    return pd.DataFrame(rows, columns=["rows", "base_vectors", "median", "p5", "p95"])
