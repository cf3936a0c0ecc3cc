"""The JSON report of the command line (docs/metrics.md, "Command line and report contract")."""

from __future__ import annotations

import json
import math
from pathlib import Path

from analysis.files import atomic_write_text
from analysis.results import ComparisonResult, MatrixResult, ModelResult

REPORT_SCHEMA_VERSION = 1


def _finite(value: float | None) -> float | None:
    """JSON has no inf/nan; an undefined number (``None``, inf, nan) is reported as null."""
    return float(value) if value is not None and math.isfinite(value) else None


def matrix_entry(matrix: MatrixResult, top_k: int, epsilons: list[float]) -> dict:
    """One matrix of the report. Fields of docs/metrics.md first, additions after."""
    return {
        "name": matrix.name,
        "layer": matrix.layer,
        "module": matrix.module,
        "shape": list(matrix.shape),
        "intruders": matrix.intruder_counts(top_k, epsilons),
        "effective_rank": float(matrix.effective_rank),
        "rank90": int(matrix.rank90),
        "stable_rank": float(matrix.stable_rank),
        "delta_fro": float(matrix.delta_fro),
        "amplification_factor": _finite(matrix.amplification_factor),
        "amplification_rank": int(matrix.amplification_rank),
        "adapter_rank": matrix.adapter_rank,
        "intruder_scores": [round(float(s), 6) for s in matrix.intruder_scores[:top_k]],
        "stack": matrix.stack,
        "expert": matrix.expert,
        "storage": matrix.id.storage,
        "tuned_storage": matrix.id.tuned_storage,
        **rl_entry(matrix, top_k, epsilons),
    }


def rl_entry(matrix: MatrixResult, top_k: int, epsilons: list[float]) -> dict:
    """The RL-versus-SFT measures of one matrix (issue 23, docs/metrics.md); none without them.

    Sparsity counts this matrix's entries; angles are in degrees (largest of the top-k
    principal angles, and every one, ascending); the intruder energy share is at each eps.
    """
    derived = {
        "spectral_shift": _finite(matrix.spectral_shift),
        "update_rank_fraction": float(matrix.update_rank_fraction),
        "intruder_energy_share": [_finite(matrix.intruder_energy_share(top_k, eps)) for eps in epsilons],
    }
    rl = matrix.rl
    if rl is None:
        return derived
    return {
        **derived,
        "update_sparsity": {"relative": rl.sparsity("relative"), "absolute": rl.sparsity("absolute")},
        "parameters": rl.counts.total,
        "principal_k": rl.k,
        "principal_angle_max": {"left": float(rl.angles_left.max()), "right": float(rl.angles_right.max())},
        "principal_angles": {"left": rl.angles_left.tolist(), "right": rl.angles_right.tolist()},
        "mask_overlap": _finite(rl.mask_overlap),
        "mask_alpha": rl.alpha,
    }


def rl_totals(model: ModelResult) -> dict:
    """Per-model sparsity: over the analysed matrices, and over every comparable parameter when known.

    Each total says which parameters it counts (``counts``).
    """
    with_rl = [m.rl for m in model.matrices if m.rl is not None]
    if not with_rl:
        return {}
    total = sum(r.counts.total for r in with_rl)
    analysed = {
        "parameters": total,
        "sparsity_relative": sum(r.counts.unchanged_relative for r in with_rl) / total,
        "sparsity_absolute": sum(r.counts.unchanged_absolute for r in with_rl) / total,
        "counts": f"the {len(with_rl)} analysed matrices only ({total} parameters)",
    }
    whole = model.summary.get("whole_model_sparsity")
    return {"sparsity_analysed_matrices": analysed, **({"sparsity_whole_model": whole} if whole else {})}


def model_entry(model: ModelResult, top_k: int, epsilons: list[float]) -> dict:
    """One fine-tune of the report: its matrices (:func:`matrix_entry`), what was not analysed, and totals.

    ``totals`` holds the intruder count summed over the matrices at each of ``epsilons``
    and the mean effective rank (0 without matrices).
    """
    per_matrix = [m.intruder_counts(top_k, epsilons) for m in model.matrices]
    totals = [sum(m[i] for m in per_matrix) for i in range(len(epsilons))]
    mean_erank = sum(m.effective_rank for m in model.matrices) / len(model.matrices) if model.matrices else 0.0
    return {
        "source": model.source,
        "kind": model.kind,
        "matrices": [matrix_entry(m, top_k, epsilons) for m in model.matrices],
        "unmatched": list(model.unmatched),
        "shape_mismatches": list(model.shape_mismatches),
        "skipped": list(model.skipped),
        "totals": {"intruders": totals, "mean_effective_rank": mean_erank, **rl_totals(model)},
        "summary": model.summary,
        "step": model.step,
    }


def to_report(result: ComparisonResult) -> dict:
    """The report as a JSON-ready dict; ``intruders[i]`` is the count at ``epsilons[i]``."""
    return {
        "base": result.base,
        "top_k": result.top_k,
        "epsilons": list(result.epsilons),
        "models": [model_entry(m, result.top_k, result.epsilons) for m in result.models],
        "schema_version": REPORT_SCHEMA_VERSION,
    }


def write_report(report: dict, path: Path | str) -> None:
    """Write atomically, so an interrupted run never leaves half a report."""
    atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False, default=str))
