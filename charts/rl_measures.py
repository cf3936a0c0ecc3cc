"""Figures of the RL-versus-SFT measures (issue 23): results in, Plotly figure out.

The rotation curve of one matrix (:func:`rotation_figure`), the Table 1 bars
(:func:`sparsity_figure`) and the chance band of an intruder score drawn onto the
intruders-vs-eps chart (:func:`add_chance_band`). Tables in :mod:`charts.rl_tables`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from analysis.cache import SpectrumCache
from analysis.results import MatrixResult, ModelResult
from charts import rl_tables, series_tables
from charts.series import group_looks, series_title
from charts.style import PALETTE, chart_text, empty_figure, legend_name, log_axis, series_style
from charts.table_words import MEASURES
from charts.tables import model_labels

#: Angles below this (degrees) are drawn at it on the log axis: float64 resolves a
#: principal angle to about 1e-12 degrees; float32-stored weights limit it to about 1e-6.
ANGLE_FLOOR_DEG = 1e-9


def rotation_figure(matrix: MatrixResult, label: str) -> go.Figure:
    """Principal angles ``theta_i`` (degrees) between the top-k singular subspaces of W0 and W1, over i.

    Left (output space) and right (input space) subspaces, Zhu et al. 2025 Sec. 4.1, on a
    log axis (RL updates turn them by well under a degree).
    """
    title = f"Principal-subspace rotation: {chart_text(matrix.short_label)}"
    table = rl_tables.angles_table(matrix)
    if table.empty:
        return empty_figure(title, "Not computed for this analysis (measures were off)")
    fig = go.Figure()
    drawn = np.maximum(table[["left_deg", "right_deg"]].to_numpy(dtype=float), ANGLE_FLOOR_DEG)
    for column, name, color, dash in (("left_deg", "left (U)", PALETTE[0], "solid"),
                                      ("right_deg", "right (V)", PALETTE[1], "dash")):  # fmt: skip
        values = table[column].to_numpy(dtype=float)
        fig.add_trace(
            go.Scatter(
                x=table["i"],
                y=np.maximum(values, ANGLE_FLOOR_DEG),
                customdata=values,
                mode="lines+markers",
                name=name,
                line={"color": color, "dash": dash},
                hovertemplate=f"{name}: θ<sub>%{{x}}</sub> = %{{customdata:.3g}}°<extra></extra>",
            )
        )
    fig.update_layout(
        title=f"{title}<br><sup>{chart_text(label)}: top {len(table)} subspaces, largest angle last</sup>",
        xaxis_title="i (principal angle index, ascending)",
        yaxis=log_axis(drawn, title="θ_i (degrees, log)"),  # one notation, labelled ticks
        height=400,
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def sparsity_figure(models: Sequence[ModelResult], base_label: str, k: int, eps: float) -> go.Figure:
    """Update sparsity per fine-tune by both rules (bars), as Zhu et al. Table 1 lists it."""
    table = rl_tables.sparsity_table(models, base_label, k, eps)
    title = "Update sparsity per fine-tune"
    if table.empty or table["sparsity_pct"].isna().all():
        return empty_figure(title, "No sparsity computed yet")
    labels = [chart_text(label) for label in table["fine_tune"]]
    fig = go.Figure()
    fig.add_bar(x=labels, y=table["sparsity_pct"], name="Zhu et al. Eq. 1 (η)", marker_color=PALETTE[0])
    fig.add_bar(x=labels, y=table["sparsity_abs_pct"], name="Mukherjee et al. (|ΔW| ≤ atol, bf16)",
                marker_color=PALETTE[1])  # fmt: skip
    fig.update_layout(
        title=f"{title}<br><sup>share of parameters left unchanged, %</sup>",
        barmode="group",
        yaxis={"title": "unchanged (%)", "range": [0, 100]},
        height=380,
        legend={"orientation": "h", "y": -0.3},
    )
    return fig


def measure_lines(models: Sequence[ModelResult], metric: str, k: int, eps: float) -> go.Figure:
    """A measure per fine-tune over layers (mean of each layer's matrices): one line per fine-tune.

    In the measure's one unit (:data:`charts.table_words.MEASURES`: a sparsity in %, as the grids above).
    """
    name = rl_tables.RL_METRICS[metric]
    measure = MEASURES[metric]
    fig = go.Figure()
    for index, (label, model) in enumerate(zip(model_labels(models), models, strict=True)):
        by_layer: dict[int, list[float]] = {}
        for m in model.matrices:
            if m.layer is not None:
                by_layer.setdefault(m.layer, []).append(rl_tables.rl_value(m, metric, k, eps))
        layers = sorted(by_layer)
        means = [
            measure.shown(float(np.nanmean(by_layer[layer]))) if np.isfinite(by_layer[layer]).any() else None
            for layer in layers
        ]
        style = series_style(index, model)
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=means,
                mode="lines+markers",
                name=legend_name(label, model),
                line={"color": style["color"], "dash": style["dash"], "width": style["width"]},
                marker={"symbol": style["symbol"], "size": style["size"]},
                hovertemplate=f"{chart_text(label)}<br>layer %{{x}}: %{{y:{measure.digits}}}{measure.suffix}"
                "<extra></extra>",
            )
        )
    fig.update_layout(
        title=f"{name} by layer<br><sup>mean over each layer's matrices</sup>",
        xaxis_title="layer",
        yaxis_title=measure.title(),
        height=380,
        legend={"orientation": "h", "y": -0.3},
    )
    return fig


def add_chance_band(fig: go.Figure, models: Sequence[ModelResult], cache: SpectrumCache | None = None) -> go.Figure:
    """Shade where an intruder count stops meaning anything: the chance level of an intruder score.

    A random direction's best ``|cos|`` against the base's singular vectors (seeded
    simulation per matrix shape, :func:`analysis.measures.chance_level`): the band spans the
    5th to 95th percentile over every shape analysed, the dotted line is the median of the
    largest shape. At an eps inside or below the band, a random vector is as likely as not to
    count as "matched", so a count there says little. ``cache``: where the levels are kept
    (:func:`analysis.chance.chance_level`; ``None``: in this process only).
    """
    table = rl_tables.chance_table(models, cache)
    if table.empty:
        return fig
    low, high = float(table["p5"].min()), float(table["p95"].max())
    median = float(table.iloc[-1]["median"])
    fig.add_vrect(x0=low, x1=high, fillcolor="grey", opacity=0.15, line_width=0, layer="below")
    # The label half-way up: the bottom holds the curves of counts of 0 (at small eps, most
    # of them), the top the eps line's label.
    fig.add_vline(x=median, line_dash="dash", line_color="grey", line_width=1,
                  annotation_text="chance", annotation_position="right")  # fmt: skip
    return fig


def series_rl_figure(table, by: str, label: str) -> go.Figure:
    """The RL-versus-SFT measures of a checkpoint series against training step, one line per group.

    ``table`` is :func:`charts.series_tables.series_table` (its measure columns come from
    :func:`charts.rl_tables.group_value`); one small panel per measure, two a row, each
    named by its short words and unit (:data:`charts.table_words.MEASURES`, whose unit every value
    is drawn in: a sparsity in %; the full names in the hover). Every panel starts at 0
    (a sparsity going from 21 % to 12 % is not drawn as from full to empty), writes its
    ticks in plain decimals (a ratio of 2e-4 was "200µ"), and the lowest panel of
    each column has the step axis' ticks and title.
    """
    from plotly.subplots import make_subplots

    names = [m for m in rl_tables.RL_METRICS if m in table.columns and table[m].notna().any()]
    if table.empty or not names:
        return empty_figure("RL vs SFT measures by step", "No measures computed yet")
    cols = 2 if len(names) > 1 else 1
    rows = (len(names) + cols - 1) // cols
    fig = make_subplots(
        rows=rows,
        cols=cols,
        shared_xaxes=True,
        vertical_spacing=0.3 / rows + 0.04,
        horizontal_spacing=0.14,  # the right column's ticks ("0.00015") clear of the left column's lines
        # Short enough for half a phone's width (two panels a row on 390 px cut
        # "Numerical rank of ΔW / min(m, n)").
        subplot_titles=[MEASURES[m].title(kind=False) for m in names],
    )
    for group, look in group_looks(table).items():  # the trends chart's colours and dashes
        part = table[table["group"] == group].sort_values("step")
        for i, metric in enumerate(names):
            fig.add_trace(
                go.Scatter(
                    x=part["step"], y=MEASURES[metric].shown(part[metric]), mode="lines+markers",
                    name=chart_text(group), legendgroup=str(group), showlegend=i == 0,
                    line={"color": look["color"], "dash": look["dash"]},
                    marker={"color": look["color"], "symbol": look["symbol"]},
                    hovertemplate=f"{chart_text(group)}<br>step %{{x}}<br>{rl_tables.RL_METRICS[metric]}: "
                    f"%{{y:{MEASURES[metric].digits}}}{MEASURES[metric].suffix}<extra></extra>",
                ),
                row=i // cols + 1, col=i % cols + 1,
            )  # fmt: skip
    for col in range(1, cols + 1):  # the lowest panel of each column (the last row may hold one)
        lowest = max(i // cols + 1 for i in range(len(names)) if i % cols + 1 == col)
        fig.update_xaxes(showticklabels=True, title_text="training step", row=lowest, col=col)
    fig.update_yaxes(rangemode="tozero", tickformat=".3~g")
    fig.update_annotations(font_size=13)
    grouping = series_tables.GROUPING_WORDS.get(by, by)
    height, top, bottom = 200 * rows + 160, 90, 80
    fig.update_layout(
        title=series_title(label, f"RL vs SFT measures against training step ({grouping})"),
        height=height,
        legend={"orientation": "h", "yanchor": "top", "y": -64 / (height - top - bottom)},  # under the step title
        margin={"t": top, "b": bottom},
    )
    return fig
