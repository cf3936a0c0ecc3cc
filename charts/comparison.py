"""Charts that put the fine-tunes side by side over their matrices.

Intruder dimensions against eps and by layer or module, effective rank, rank90 and
amplification factor by layer.

Pure functions (no Streamlit, no I/O), each drawn from the matching table of
:mod:`charts.tables` (:func:`~charts.tables.sweep_table`, :func:`~charts.tables.breakdown_table`,
:func:`~charts.tables.matrix_table`, :func:`~charts.tables.amplification_table`), which is
also what the page offers as CSV.

References: intruder dimensions, Shuttleworth et al. 2024 (arXiv:2410.21228, Def. 3.1);
effective rank, Roy & Vetterli 2007; rank90, Biderman et al. 2024 (arXiv:2405.09673);
amplification factor, Hu et al. 2021 (arXiv:2106.09685, sec. 7.3).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.results import ModelResult
from charts import overview_tables, tables
from charts.colors import count_ticks
from charts.style import (
    chart_text,
    empty_figure,
    layer_sort,
    legend_name,
    log_axis,
    model_style,
    series_mode,
    series_style,
)


def sweep_figure(
    models: Sequence[ModelResult],
    k: int,
    epsilons: Sequence[float],
    eps: float | None = None,
    matrices: Collection[str] | None = None,
) -> go.Figure:
    """Intruder dimensions against eps, one curve per fine-tune (summed over matrices).

    Counts among the top ``k`` tuned vectors (Shuttleworth et al. Def. 3.1) summed over
    ``matrices`` (all analysed when ``None``); the current ``eps`` is marked. Curves that
    coincide (several fine-tunes with no intruders lie on zero) stay visible: each has its
    own dash pattern and marker, drawn thinner and smaller on top of the earlier ones.

    Parameters
    ----------
    models : sequence of ModelResult
        The fine-tunes, in the order they are drawn.
    k : int
        How many top tuned singular vectors are searched for intruders.
    epsilons : sequence of float
        The thresholds on the x axis.
    eps : float or None
        The current threshold, marked by a dotted line.
    matrices : collection of str or None
        Matrix keys (:attr:`analysis.identity.MatrixId.key`) to keep; ``None`` keeps every analysed matrix.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    table = tables.sweep_table(models, k, epsilons, matrices)
    title = f"Intruder dimensions vs ε (top {k})"
    if table.empty:
        return empty_figure(title, "No fine-tunes analysed yet")
    fig = go.Figure()
    for index, (label, model) in enumerate(zip(tables.model_labels(models), models, strict=True)):
        rows = table[table["model"] == label]
        style = series_style(index, model)
        fig.add_trace(
            go.Scatter(
                x=rows["epsilon"],
                y=rows["intruders"],
                mode="lines+markers",
                name=legend_name(label, model),
                line={"color": style["color"], "dash": style["dash"], "width": style["width"]},
                marker={"symbol": style["symbol"], "size": style["size"], "line": {"width": 1}},
                hovertemplate=f"{chart_text(label)}<br>ε = %{{x:.2f}}: %{{y}} intruders<extra></extra>",
            )
        )
    if eps is not None:
        fig.add_vline(x=eps, line_dash="dot", line_color="grey", annotation_text=f"ε = {eps:g}")
    n = int(table["matrices"].max())
    top = float(table["intruders"].max())
    fig.update_layout(
        title=f"{title}<br><sup>summed over {n} matrices</sup>",
        xaxis_title="ε (threshold on the best |cos|)",
        # A little room below zero, so curves lying on zero are not cut by the axis.
        yaxis={
            "title": "intruder dimensions",
            "range": [-0.04 * max(top, 5), 1.08 * max(top, 5)],
            **count_ticks(max(top, 5), most=8),
        },
        height=440,
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def breakdown_figure(
    models: Sequence[ModelResult], k: int, eps: float, by: str, matrices: Collection[str] | None = None
) -> go.Figure:
    """Intruder counts at (k, eps) per layer or per module, grouped bars per fine-tune.

    Parameters
    ----------
    models : sequence of ModelResult
        The fine-tunes, in the order they are drawn.
    k : int
        How many top tuned singular vectors are searched for intruders.
    eps : float
        The threshold on the best match below which a tuned vector is an intruder.
    by : str
        ``"layer"`` or ``"module"``.
    matrices : collection of str or None
        Matrix keys (:attr:`analysis.identity.MatrixId.key`) to keep; ``None`` keeps every analysed matrix.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    table = tables.breakdown_table(models, k, eps, by, matrices)
    # Short first line (a phone cut the long one), the settings below it.
    title = f"Intruder dimensions by {by}<br><sup>top {k}, ε = {eps:g}</sup>"
    if table.empty:
        return empty_figure(title, "No matrices analysed yet")
    order = tables.module_order(table["module"]) if by == "module" else sorted(table["layer"].unique(), key=layer_sort)
    fig = go.Figure()
    nothing = []  # fine-tunes without an intruder here: a bar of height 0 draws nothing
    for index, (label, model) in enumerate(zip(tables.model_labels(models), models, strict=True)):
        rows = table[table["model"] == label].set_index(by).reindex(order)
        if not rows["intruders"].fillna(0).any():
            nothing.append(label)
            continue
        style = model_style(index, model)
        fig.add_trace(
            go.Bar(
                x=[chart_text(o) for o in order],
                y=rows["intruders"].fillna(0),
                name=legend_name(label, model),
                marker_color=style["color"],
                marker_pattern_shape=style["pattern"],
            )
        )
    top = float(table["intruders"].max())
    if nothing:
        # Named under the title instead of legend entries that draw nothing.
        title = title.replace("</sup>", f" · no intruders: {chart_text(', '.join(nothing))}</sup>")
    if not fig.data:
        fig.add_trace(go.Bar(x=[chart_text(o) for o in order], y=[0] * len(order), showlegend=False, hoverinfo="skip"))
    fig.update_layout(
        title=title,
        barmode="group",
        xaxis={"title": by, "type": "category"},
        yaxis={"title": "intruder dimensions", "range": [0, 1.08 * max(top, 1)], **count_ticks(max(top, 1), most=6)},
        showlegend=True,
        legend={"orientation": "h", "y": -0.3},  # below: beside the bars it took a phone's width
        height=400,
    )
    return fig


def _facet_grid(n_panels: int, max_cols: int = 3) -> tuple[int, int]:
    """(rows, cols) for ``n_panels`` facets wrapping after ``max_cols``."""
    cols = max(1, min(max_cols, n_panels))
    return math.ceil(n_panels / cols), cols


def _facets(table) -> list[tuple[str | None, str, bool]]:
    """The facets of a per-matrix table: ``(stack, module, experts)``.

    Stacks as first met, modules in block order, an expert module's facet after the
    module's own.
    """
    stacks = list(dict.fromkeys(None if pd.isna(s) else s for s in table["stack"]))
    modules = tables.module_order(table["module"])
    found = {
        (None if pd.isna(s) else s, m, not pd.isna(e))
        for s, m, e in zip(table["stack"], table["module"], table["expert"], strict=True)
    }
    return sorted(found, key=lambda f: (stacks.index(f[0]), modules.index(f[1]), f[2]))


def _facet_title(facet: tuple[str | None, str, bool]) -> str:
    """A facet's subplot title: ``decoder · query``, ``experts of down``."""
    stack, module, experts = facet
    what = f"experts of {chart_text(module)}" if experts else chart_text(module)
    return f"{chart_text(stack)} · {what}" if stack else what


def _in_facet(rows, facet: tuple[str | None, str, bool]):
    """The rows of a per-matrix table that fall in ``facet``."""
    stack, module, experts = facet
    same_stack = rows["stack"].isna() if stack is None else rows["stack"] == stack
    return rows[same_stack & (rows["module"] == module) & (rows["expert"].notna() == experts)]


def _module_facets(
    models: Sequence[ModelResult],
    table,
    column: str,
    name: str,
    *,
    log_y: bool,
    rank_lines: bool = False,
    max_cols: int = 3,
) -> go.Figure:
    """``column`` by layer, one facet per stack and module (wrapping after ``max_cols``).

    One series per fine-tune with its own colour, dash and marker; hover names the matrix
    by its short label (``decoder L3 cross_attn_out``, ``L3 E17 down``).

    Every matrix is its own point: an encoder's and a decoder's layer 0 are in different
    facets (``encoder · query``, ``decoder · query``), and the experts of a mixture-of-
    experts module get a facet of their own (``experts of down``) where each expert is one
    marker at its layer (no line: many points share a layer). ``rank_lines`` adds a dotted
    line at each LoRA's rank ``r``.
    """
    facets = _facets(table)
    layers = sorted(table["layer"].unique(), key=layer_sort)
    n_rows, n_cols = _facet_grid(len(facets), max_cols)
    fig = make_subplots(
        rows=n_rows,
        cols=n_cols,
        shared_yaxes=True,
        shared_xaxes=True,
        subplot_titles=[_facet_title(f) for f in facets],
        horizontal_spacing=0.03,
        # A fraction of the whole height: shrinks with more rows, so gaps stay about 40 px.
        vertical_spacing=min(0.08, 0.16 / n_rows) if n_rows > 1 else 0.02,
    )
    values = []
    for index, (label, model) in enumerate(zip(tables.model_labels(models), models, strict=True)):
        style = series_style(index, model)
        rows = table[table["model"] == label]
        for pos, facet in enumerate(facets):
            sub = _in_facet(rows, facet)
            if log_y:
                sub = sub[sub[column] > 0]
            values.extend(sub[column].tolist())
            fig.add_trace(
                go.Scatter(
                    x=sub["layer"],
                    y=sub[column],
                    mode="markers" if facet[2] else series_mode(len(sub)),
                    name=legend_name(label, model),
                    legendgroup=label,
                    showlegend=pos == 0,
                    customdata=[chart_text(label) for label in sub["label"]],
                    line={"color": style["color"], "dash": style["dash"], "width": style["width"]},
                    marker={
                        "symbol": style["symbol"],
                        "size": style["size"] - (4 if facet[2] else 2),
                        "color": style["color"],
                        "opacity": 0.7 if facet[2] else 1.0,  # experts at one layer overlap
                    },
                    hovertemplate=f"{chart_text(label)}<br>%{{customdata}}<br>{name}: %{{y:.3g}}<extra></extra>",
                ),
                row=pos // n_cols + 1,
                col=pos % n_cols + 1,
            )
        rank = tables.adapter_rank(model) if rank_lines else None
        if rank is not None:
            values.append(rank)
            for pos in range(len(facets)):
                fig.add_hline(
                    y=rank,
                    line_dash="dot",
                    line_color=style["color"],
                    opacity=0.6,
                    row=pos // n_cols + 1,
                    col=pos % n_cols + 1,
                )
    # Few layers: every one labelled; many: Plotly picks the ticks.
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=layers, nticks=min(len(layers), 12))
    fig.update_xaxes(title_text="layer", row=n_rows)
    if log_y:
        fig.update_yaxes(**log_axis(values))
    else:
        # One range for every facet (rows of facets share nothing by themselves), from 0.
        top = max((v for v in values if v == v), default=1.0)
        fig.update_yaxes(range=[0, 1.05 * (top or 1.0)], autorange=False)
    fig.update_yaxes(title_text=name, col=1)
    fig.update_annotations(font_size=12)
    height = 120 + 260 * n_rows
    fig.update_layout(height=height, legend={"orientation": "h", "y": -80 / (height - 100)})
    return fig


def effective_rank_figure(
    models: Sequence[ModelResult], metric: str = "effective_rank", log_y: bool = True
) -> go.Figure:
    """Effective rank or rank90 of every update by layer, one facet per stack and module.

    Experts of a module are in a facet of their own, one marker each. All fine-tunes side
    by side, each with its own colour, dash and marker; the LoRA rank ``r`` (the most a
    LoRA update's rank can be) as a dotted line. ``log_y`` (the default) keeps rank-1 and
    rank-8 updates readable beside a full fine-tune's hundreds.
    Effective rank: Roy & Vetterli 2007 on ``dW`` as in Shuttleworth et al.; rank90:
    Biderman et al. 2024.

    Parameters
    ----------
    models : sequence of ModelResult
        The fine-tunes, in the order they are drawn.
    metric : str
        ``"effective_rank"`` or ``"rank90"``.
    log_y : bool
        Whether the y axis is logarithmic.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    if metric not in ("effective_rank", "rank90"):
        raise ValueError(f"metric must be 'effective_rank' or 'rank90', got {metric!r}")
    name = overview_tables.OVERVIEW_METRICS[metric]
    table = tables.matrix_table(models)
    if table.empty:
        return empty_figure(name, "No matrices analysed yet")
    fig = _module_facets(models, table, metric, name, log_y=log_y, rank_lines=True)
    fig.update_layout(title=f"{name}<br><sup>by layer, stack and module; dotted: LoRA rank r</sup>")
    return fig


def amplification_figure(
    models: Sequence[ModelResult], matrices: Collection[str] | None = None, log_y: bool = True
) -> go.Figure:
    """Amplification factor per matrix (Hu et al. 2021, sec. 7.3) by layer.

    One facet per stack and module (experts in their own facet, one marker each) and one
    series per fine-tune (every fine-tune in the legend), every matrix its own point, named
    by its short label (``L3 mlp_in``) in the hover.

    Parameters
    ----------
    models : sequence of ModelResult
        The fine-tunes, in the order they are drawn.
    matrices : collection of str or None
        Matrix keys (:attr:`analysis.identity.MatrixId.key`) to keep; ``None`` keeps every analysed matrix.
    log_y : bool
        Whether the y axis is logarithmic.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    table = tables.amplification_table(models, matrices)
    title = "Amplification factor<br><sup>‖ΔW‖_F / ‖Uᵀ W₀ V‖_F by layer, stack and module</sup>"
    if table.empty:
        return empty_figure(title, "No matrices analysed yet")
    fig = _module_facets(models, table, "amplification_factor", "amplification factor", log_y=log_y)
    fig.update_layout(title=title)
    return fig
