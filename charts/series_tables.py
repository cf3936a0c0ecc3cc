"""Tidy tables of a checkpoint series (:mod:`analysis.specs.series`).

The numbers behind the Series page's charts (:mod:`charts.series`) and its CSV downloads.

Pure functions: the checkpoints' results in, :class:`pandas.DataFrame` out. Each
checkpoint is a :class:`ModelResult` with its training ``step``; the per-matrix metrics
are those of :mod:`charts.tables`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.results import MatrixResult, ModelResult
from charts.matrix_tables import intruder_table
from charts.overview_tables import OVERVIEW_METRICS, grid_cell
from charts.rl_tables import RL_METRICS, group_value, rl_value
from charts.tables import IDENTITY_COLUMNS, identity_order, layer_label

#: How the series trends are grouped: one line for the whole model, per layer, per module kind
#: or per matrix.
SERIES_GROUPINGS: tuple[str, ...] = ("model", "layer", "module", "matrix")
#: Each grouping in words, as the charts' titles name it.
GROUPING_WORDS: dict[str, str] = {
    "model": "whole model",
    "layer": "per layer",
    "module": "per module",
    "matrix": "per matrix",
}
#: The metrics a series is drawn in (those of the overview and the update's norm), with
#: their display names.
SERIES_METRICS: dict[str, str] = {
    **{key: name for key, name in OVERVIEW_METRICS.items() if key not in RL_METRICS},
    "delta_fro": "Frobenius norm ‖ΔW‖",
}


def by_step(models: Sequence[ModelResult]) -> list[ModelResult]:
    """The checkpoints of a series in step order (a model without a step goes last).

    Parameters
    ----------
    models : sequence of ModelResult
        The checkpoints of one series, each with its ``step``.

    Returns
    -------
    list of ModelResult
    """
    return sorted(models, key=lambda m: (m.step is None, m.step or 0))


#: Where a matrix lives, in the per-matrix series table (its group is the matrix's short label).
MATRIX_IDENTITY: tuple[str, ...] = ("stack", "layer", "module", "expert")


def _identity(matrix: MatrixResult, column: str) -> object:
    return layer_label(matrix.layer) if column == "layer" else getattr(matrix, column)


def _series_group(matrix: MatrixResult, by: str) -> str:
    if by == "model":
        return "whole model"
    if by == "layer":
        stack = f"{matrix.stack} " if matrix.stack else ""
        return f"{stack}L{layer_label(matrix.layer)}"
    if by == "module":  # an encoder's and a decoder's query are two lines, as in breakdown_table
        return f"{matrix.stack} {matrix.module}" if matrix.stack else matrix.module
    if by == "matrix":
        return matrix.short_label
    raise ValueError(f"unknown grouping {by!r}; one of {SERIES_GROUPINGS}")


def series_table(models: Sequence[ModelResult], k: int, eps: float, by: str = "model") -> pd.DataFrame:
    """Metrics of each checkpoint of a series against its step, grouped ``by`` one of :data:`SERIES_GROUPINGS`.

    The groups: the whole model; a layer or a module kind of one stack
    (``encoder L0``, ``decoder query``: stacks never share a group), with every expert of the
    layer or module in it; or one matrix (its short label, so each expert its own line).

    Per group and step: ``intruders`` is the sum of intruder counts among the top ``k``
    at ``eps`` (Shuttleworth et al. 2024, Def. 3.1; the per-model total of DESIGN.md);
    ``effective_rank`` and ``rank90`` the mean over the group's matrices (Roy & Vetterli
    2007; Biderman et al. 2024); ``delta_fro`` the Frobenius norm of the group's updates
    taken together, ``sqrt(sum ||dW||_F^2)``.

    Parameters
    ----------
    models : sequence of ModelResult
        The checkpoints of one series, each with its ``step``.
    k : int
        How many top tuned singular vectors are searched for intruders.
    eps : float
        The threshold on the best match below which a tuned vector is an intruder.
    by : str
        One of :data:`SERIES_GROUPINGS`.

    Returns
    -------
    pandas.DataFrame
        One row per step and group: ``step``, ``checkpoint``, ``group``, ``matrices`` and
        the metrics of :data:`SERIES_METRICS`; per matrix also where the matrix lives
        (:data:`MATRIX_IDENTITY`, which the chart's colours and dashes follow).
    """
    rows = []
    identity = MATRIX_IDENTITY if by == "matrix" else ()
    for model in by_step(models):
        groups: dict[str, list[MatrixResult]] = {}
        for m in model.matrices:
            groups.setdefault(_series_group(m, by), []).append(m)
        for group, matrices in groups.items():
            rows.append(
                {
                    "step": model.step,
                    "checkpoint": model.label,
                    "group": group,
                    **{column: _identity(matrices[0], column) for column in identity},
                    "matrices": len(matrices),
                    "intruders": sum(m.intruder_counts(k, [eps])[0] for m in matrices),
                    "effective_rank": float(np.mean([m.effective_rank for m in matrices])),
                    "rank90": float(np.mean([m.rank90 for m in matrices])),
                    "delta_fro": float(np.sqrt(sum(float(m.delta_fro) ** 2 for m in matrices))),
                    **{metric: group_value(matrices, metric, k, eps) for metric in RL_METRICS},
                }
            )
    columns = ["step", "checkpoint", "group", *identity, "matrices"]
    columns += ["intruders", "effective_rank", "rank90", "delta_fro"]
    columns += list(RL_METRICS)  # the RL-versus-SFT measures of the group (charts.rl_tables.group_value)
    return pd.DataFrame(rows, columns=columns)


#: Columns of :func:`series_grid_table` (and its CSV), before the metric's own.
SERIES_GRID_COLUMNS: tuple[str, ...] = ("step", "section", "row", "column", "matrix", "name", *IDENTITY_COLUMNS)


def series_grid_table(models: Sequence[ModelResult], metric: str, k: int, eps: float) -> pd.DataFrame:
    """One row per checkpoint and matrix, placed in its grid cell as the overview places it.

    As :func:`charts.overview_tables.overview_table` does: ``section`` names the grid (one
    layer x module grid per stack, one layer x expert grid per mixture-of-experts module),
    ``row`` and ``column`` the cell, so (``step``, ``section``, ``row``, ``column``) is unique. ``matrix`` is the
    :attr:`~analysis.identity.MatrixId.key`; the last column is ``metric`` (one of :data:`SERIES_METRICS`).

    Parameters
    ----------
    models : sequence of ModelResult
        The checkpoints of one series, each with its ``step``.
    metric : str
        One of :data:`SERIES_METRICS`.
    k : int
        How many top tuned singular vectors are searched for intruders.
    eps : float
        The threshold on the best match below which a tuned vector is an intruder.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`SERIES_GRID_COLUMNS` and ``metric``.
    """
    if metric not in SERIES_METRICS:
        raise ValueError(f"unknown metric {metric!r}; one of {list(SERIES_METRICS)}")
    rows = []
    for model in by_step(models):
        for m in identity_order(model.matrices):
            if metric in RL_METRICS:
                value = rl_value(m, metric, k, eps)
            else:
                value = m.intruder_counts(k, [eps])[0] if metric == "intruders" else float(getattr(m, metric))
            rows.append({"step": model.step, **grid_cell(m), metric: value})
    return pd.DataFrame(rows, columns=[*SERIES_GRID_COLUMNS, metric])


def series_similarity_table(models: Sequence[ModelResult], matrix: str, k: int, eps: float) -> pd.DataFrame:
    """Each checkpoint's top ``k`` tuned vectors of one matrix (its :attr:`~analysis.identity.MatrixId.key`).

    Their best match with the base and whether each is an intruder at ``eps``
    (:func:`charts.matrix_tables.intruder_table` per step).

    Parameters
    ----------
    models : sequence of ModelResult
        The checkpoints of one series, each with its ``step``.
    matrix : str
        The matrix's :attr:`~analysis.identity.MatrixId.key`.
    k : int
        How many top tuned singular vectors are searched for intruders.
    eps : float
        The threshold on the best match below which a tuned vector is an intruder.

    Returns
    -------
    pandas.DataFrame
        ``step`` and the columns of :func:`charts.matrix_tables.intruder_table` (only ``step`` when
        no checkpoint has the matrix).
    """
    frames = [
        intruder_table(m, k, eps).assign(step=model.step)
        for model in by_step(models)
        for m in model.matrices
        if m.key == matrix
    ]
    if not frames:
        return pd.DataFrame(columns=["step"])
    table = pd.concat(frames, ignore_index=True)
    return table[["step", *[c for c in table.columns if c != "step"]]]
