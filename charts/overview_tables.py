"""Where each matrix sits in the overview's grids, and the overview's table.

One layer x module grid per stack and one layer x expert grid per mixture-of-experts
module; :func:`grid_cell` places a matrix in them, for the overview
(:func:`overview_table`, drawn by :mod:`charts.overview`) and for a checkpoint series'
grids (:func:`charts.series_tables.series_grid_table`). Pure functions: results in,
:class:`pandas.DataFrame` out.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from analysis.results import MatrixResult, ModelResult
from charts.rl_tables import RL_METRICS, rl_value
from charts.tables import IDENTITY_COLUMNS, identity_order, layer_label, model_labels, training_method

#: The metrics an overview grid can show (:func:`overview_table`), with their display names.
OVERVIEW_METRICS: dict[str, str] = {
    "intruders": "Intruder dimensions",
    "effective_rank": "Effective rank of ΔW",
    "rank90": "rank90 of ΔW",
    **RL_METRICS,  # the RL-versus-SFT measures (charts.rl_tables)
}

#: Columns of :func:`overview_table`.
OVERVIEW_COLUMNS: tuple[str, ...] = (
    "section",
    "model_index",
    "model",
    "method",
    "row",
    "column",
    "matrix",
    "name",
    *IDENTITY_COLUMNS,
    "value",
)


def overview_section(matrix: MatrixResult) -> tuple[str | None, str | None]:
    """Which overview grid a matrix is drawn in.

    ``(stack, None)`` for its stack's layer x module grid, ``(stack, module)`` for the
    layer x expert grid of an expert module.

    Parameters
    ----------
    matrix : MatrixResult
        One analysed matrix.

    Returns
    -------
    tuple of (str or None, str or None)
    """
    return (matrix.stack, None if matrix.expert is None else matrix.module)


def section_title(section: tuple[str | None, str | None]) -> str:
    """Words for an overview grid: ``decoder: layer × module``, ``experts of down: layer × expert``.

    Parameters
    ----------
    section : tuple of (str or None, str or None)
        An :func:`overview_section`.

    Returns
    -------
    str
    """
    stack, expert_module = section
    where = f"{stack}: " if stack else ""
    if expert_module is None:
        return f"{where}layer × module"
    return f"{where}experts of {expert_module}: layer × expert"


def grid_cell(matrix: MatrixResult) -> dict:
    """Where a matrix sits in an overview-style grid, and its identity.

    The place is :func:`overview_section` as text, row and column: the columns the overview
    and the series grid share.

    Parameters
    ----------
    matrix : MatrixResult
        One analysed matrix.

    Returns
    -------
    dict
        ``section``, ``row``, ``column``, ``matrix``, ``name`` and :data:`IDENTITY_COLUMNS`.
    """
    return {
        "section": section_title(overview_section(matrix)),
        "row": layer_label(matrix.layer),
        "column": matrix.module if matrix.expert is None else str(matrix.expert),
        "matrix": matrix.key,
        "name": matrix.name,
        "stack": matrix.stack,
        "layer": layer_label(matrix.layer),
        "module": matrix.module,
        "expert": matrix.expert,
        "label": matrix.short_label,
    }


def overview_table(models: Sequence[ModelResult], metric: str, k: int, eps: float) -> pd.DataFrame:
    """One row per fine-tune and matrix, placed in its overview grid cell.

    ``section`` (:func:`overview_section`, as text by :func:`section_title`) names the
    grid: one per stack with a row per layer and a column per module, and one per
    mixture-of-experts module with a column per expert. ``row`` and ``column`` are the
    cell's labels; (``model``, ``section``, ``row``, ``column``) is unique because a
    matrix's identity (stack, layer, module, expert) is. ``value`` is ``metric``:
    ``intruders`` (count among the top ``k`` tuned vectors at ``eps``, Shuttleworth et al.
    2024 Def. 3.1), ``effective_rank`` (Roy & Vetterli 2007) or ``rank90`` (Biderman et
    al. 2024) of the update.

    Parameters
    ----------
    models : sequence of ModelResult
        The fine-tunes, in the order they are drawn.
    metric : str
        One of :data:`OVERVIEW_METRICS`.
    k : int
        How many top tuned singular vectors are searched for intruders.
    eps : float
        The threshold on the best match below which a tuned vector is an intruder.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`OVERVIEW_COLUMNS`.
    """
    if metric not in OVERVIEW_METRICS:
        raise ValueError(f"metric must be one of {sorted(OVERVIEW_METRICS)}, got {metric!r}")
    rows = []
    for index, (label, model) in enumerate(zip(model_labels(models), models, strict=True)):
        method = training_method(model)
        for m in identity_order(model.matrices):
            if metric == "intruders":
                value = float(m.intruder_counts(k, [eps])[0])
            elif metric in RL_METRICS:
                value = rl_value(m, metric, k, eps)
            else:
                value = float(getattr(m, metric))
            rows.append({"model_index": index, "model": label, "method": method, **grid_cell(m), "value": value})
    return pd.DataFrame(rows, columns=list(OVERVIEW_COLUMNS))
