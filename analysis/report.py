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
    }


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
        "totals": {"intruders": totals, "mean_effective_rank": mean_erank},
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
