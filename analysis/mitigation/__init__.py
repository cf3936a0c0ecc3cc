"""Intruder-dimension mitigation (Shuttleworth et al. 2024, section 6 and Fig. 8).

- :mod:`analysis.mitigation.procedure`: the maths, matrix by matrix (PEFT's
  ``reduce_intruder_dimension``);
- :mod:`analysis.mitigation.run`: mitigate a fine-tune and analyse it before and after;
- :mod:`analysis.mitigation.clock`: how long a run has left, from its measured step costs;
- :mod:`analysis.mitigation.export`: write the result as a PEFT adapter or a model folder;
- :mod:`analysis.mitigation.tradeoff` and :mod:`analysis.mitigation.heldout`: the
  forgetting / task trade-off curve.
"""

from analysis.mitigation.clock import StepClock
from analysis.mitigation.export import export_adapter, export_merged
from analysis.mitigation.procedure import (
    RULES,
    MatrixMitigation,
    Mitigation,
    MitigationSettings,
    find_intruders,
    mitigate_matrix,
    mitigate_plan,
    mitigated_plan,
    refactor,
)
from analysis.mitigation.run import MitigationResult, analyse, intruder_table, plan_for, run
from analysis.mitigation.tradeoff import LAMBDA_GRID, TRADEOFF_STEP, Tradeoff, evaluate_tradeoff, tradeoff_grid

__all__ = [
    "LAMBDA_GRID",
    "RULES",
    "StepClock",
    "TRADEOFF_STEP",
    "MatrixMitigation",
    "Mitigation",
    "MitigationResult",
    "MitigationSettings",
    "Tradeoff",
    "analyse",
    "evaluate_tradeoff",
    "export_adapter",
    "export_merged",
    "find_intruders",
    "intruder_table",
    "mitigate_matrix",
    "mitigate_plan",
    "mitigated_plan",
    "plan_for",
    "refactor",
    "run",
    "tradeoff_grid",
]
