"""Plotly figure builders for the dashboard: results in, figure out.

Pure functions (no Streamlit, no I/O), so the same charts can be drawn in a notebook.
Each figure is drawn from the matching table of :mod:`charts.tables`, which is also
what the page offers as CSV. Large heatmaps are reduced here, on the server, before
anything reaches a browser (:func:`reduce_heatmap`).

References: intruder dimensions and the similarity matrix, Shuttleworth et al. 2024
(arXiv:2410.21228, Def. 3.1, Fig. 1/3); effective rank, Roy & Vetterli 2007; rank90,
Biderman et al. 2024 (arXiv:2405.09673); subspace similarity and amplification factor,
Hu et al. 2021 (arXiv:2106.09685, sec. 7).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from analysis.results import MatrixResult, ModelResult
from charts import tables

#: Largest heatmap side sent to a browser; bigger ones are reduced by block maximum.
MAX_HEATMAP_SIDE = 128
#: Largest number of points per spectrum line; longer spectra are sampled log-evenly.
MAX_SPECTRUM_POINTS = 1500

PALETTE = qualitative.D3
INTRUDER_COLOR = "#d62728"
OVERVIEW_METRICS = {
    "intruders": "Intruder dimensions",
    "effective_rank": "Effective rank of ΔW",
    "rank90": "rank90 of ΔW",
}


def chart_config(filename: str) -> dict:
    """Plotly config for ``st.plotly_chart``: a toolbar PNG download named ``filename``."""
    return {
        "displaylogo": False,
        "toImageButtonOptions": {"format": "png", "filename": filename, "scale": 2},
    }


def _rank_heatmap(z: np.ndarray, block: int, **style) -> go.Heatmap:
    """A [0, 1] heatmap over 1-based ranks whose cells are ``block`` ranks wide.

    ``z`` and ``block`` come from :func:`reduce_heatmap`; each cell is centred on the
    middle of the ranks it summarises.
    """
    center = (block + 1) / 2
    return go.Heatmap(z=z, x0=center, dx=block, y0=center, dy=block, zmin=0, zmax=1, **style)


def reduce_heatmap(z: np.ndarray, max_side: int = MAX_HEATMAP_SIDE) -> tuple[np.ndarray, int]:
    """Shrink a heatmap to at most ``max_side`` cells a side by taking block maxima.

    Block maxima keep every strong entry visible (an intruder's missing match or a
    single strong alignment never averages away). Returns the reduced array and the
    block size (1 when nothing was reduced); NaN-only blocks stay NaN.
    """
    z = np.asarray(z, dtype=np.float64)
    block = max(1, math.ceil(max(z.shape) / max_side)) if z.size else 1
    if block == 1:
        return z, 1
    rows, cols = math.ceil(z.shape[0] / block), math.ceil(z.shape[1] / block)
    padded = np.full((rows * block, cols * block), np.nan)
    padded[: z.shape[0], : z.shape[1]] = z
    blocks = padded.reshape(rows, block, cols, block).transpose(0, 2, 1, 3).reshape(rows, cols, -1)
    with np.errstate(all="ignore"):
        reduced = np.where(np.isnan(blocks).all(axis=2), np.nan, np.nanmax(np.nan_to_num(blocks, nan=-np.inf), axis=2))
    return reduced, block


def _model_style(index: int, model: ModelResult) -> dict:
    """Colour per fine-tune; LoRA dashed with diamonds, full fine-tuning solid circles."""
    lora = tables.is_lora(model)
    return {
        "color": PALETTE[index % len(PALETTE)],
        "dash": "dash" if lora else "solid",
        "symbol": "diamond" if lora else "circle",
    }


def _legend_name(label: str, model: ModelResult) -> str:
    """``label (method)``, or the label alone when it names the method already
    (the demo's "LoRA r=1", never "LoRA r=1 (LoRA r=1)")."""
    method = tables.training_method(model)
    return label if tables.names_method(label, method) else f"{label} ({method})"


def _empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False, height=300)
    return fig


#: Dash patterns and marker symbols cycled per fine-tune, so curves that coincide (all at
#: zero, say) still show each other: later ones are drawn thinner and smaller on top.
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot", "5px,2px,1px,2px", "1px,3px")
SYMBOLS = ("circle", "diamond", "square", "triangle-up", "x", "cross", "star", "triangle-down")


def _series_style(index: int, model: ModelResult) -> dict:
    """A colour, a dash pattern and a marker per fine-tune, all distinct up to 8 series.

    Sizes shrink with ``index`` so that markers drawn at the same point stay visible as
    nested shapes.
    """
    return {
        "color": PALETTE[index % len(PALETTE)],
        "dash": DASHES[index % len(DASHES)],
        "symbol": SYMBOLS[index % len(SYMBOLS)],
        "size": max(5, 13 - 1.2 * (index % len(SYMBOLS))),
        "width": max(1.2, 3.0 - 0.3 * (index % len(SYMBOLS))),
    }


def _series_mode(n_points: int) -> str:
    """Markers where a line cannot be seen (a single point), lines and markers for short
    series, plain lines for long ones."""
    if n_points <= 1:
        return "markers"
    return "lines+markers" if n_points <= 40 else "lines"


def log_ticks(low: float, high: float) -> tuple[list[float], list[str]]:
    """Tick values and labels for a log axis over ``[low, high]`` (both > 0).

    Powers of ten labelled in plain numbers (``0.001``, ``1``, ``100``) or as ``1e-5``
    below 0.001 and from 1e5 up; 2 and 5 times them are added only when the range spans
    less than two decades, so there are never unlabelled minor digits or SI prefixes
    (``100µ``).
    """
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 or high <= 0:
        return [1.0], ["1"]
    low, high = min(low, high), max(low, high)
    e0, e1 = math.floor(math.log10(low)), math.ceil(math.log10(high))
    mults = (1, 2, 5) if e1 - e0 <= 2 else (1,)
    step = max(1, math.ceil((e1 - e0 + 1) / 8))
    values = [m * 10.0**e for e in range(e0, e1 + 1, 1 if len(mults) > 1 else step) for m in mults]
    values = [v for v in values if low / 1.0001 <= v <= high * 1.0001] or [10.0**e0]

    def fmt(v: float) -> str:
        if 1e-3 <= v < 1e5:
            return f"{v:.10g}"
        mantissa, exponent = f"{v:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"

    return values, [fmt(v) for v in values]


def _log_axis(values, **extra) -> dict:
    """A log axis spanning the positive ``values`` with :func:`log_ticks`."""
    arr = np.asarray([v for v in np.ravel(np.asarray(values, dtype=np.float64)) if np.isfinite(v) and v > 0])
    if arr.size == 0:
        return {"type": "log", **extra}
    low, high = float(arr.min()), float(arr.max())
    tickvals, ticktext = log_ticks(low, high)
    pad = 0.05 * max(math.log10(high) - math.log10(low), 0.5)
    return {
        "type": "log",
        "tickvals": tickvals,
        "ticktext": ticktext,
        "range": [math.log10(low) - pad, math.log10(high) + pad],
        **extra,
    }


def _facet_grid(n_panels: int, max_cols: int = 3) -> tuple[int, int]:
    """(rows, cols) for ``n_panels`` facets wrapping after ``max_cols``."""
    cols = max(1, min(max_cols, n_panels))
    return math.ceil(n_panels / cols), cols


@dataclass(frozen=True)
class OverviewSection:
    """One grid of the overview, drawn once per fine-tune with the same rows and columns.

    ``title`` names the grid (:func:`charts.tables.section_title`), ``panels`` holds one
    figure per fine-tune that has matrices in it (``model_indices`` says which), and
    ``columns`` is how many panels fit side by side on a wide screen (narrow grids three,
    wide expert grids fewer).
    """

    title: str
    panels: list[go.Figure]
    model_indices: list[int]
    columns: int


#: Grid cells are this many pixels high (fewer for deep models), so a panel's height
#: depends on its layers only, never on how many fine-tunes share the page.
OVERVIEW_CELL_PX = (7, 22)
#: The least height of a grid's cells (and so of its colour bar), in pixels.
OVERVIEW_MIN_GRID_PX = 90
#: Cell text only where a cell can hold it: at most this many columns, cells this high.
OVERVIEW_TEXT_MAX_COLUMNS = 12
OVERVIEW_TEXT_MIN_PX = 14
#: At most this many tick labels on the layer and expert axes (every module is named).
OVERVIEW_MAX_TICKS = 25


def _layer_sort(label: str) -> tuple[bool, int]:
    return (label == "other", int(label) if label.isdigit() else 0)


def _thinned(n: int, most: int = OVERVIEW_MAX_TICKS) -> list[int]:
    step = max(1, math.ceil(n / most))
    return list(range(0, n, step))


def _overview_panel(
    cells, rows: list[str], columns: list[str], *, experts: bool, metric: str, zmax: float, title: str
) -> go.Figure:
    """One fine-tune's grid: a heatmap and, on the same cells, one selectable point each.

    Both traces are placed on integer coordinates (row ``i``, column ``j``) from the one
    ``rows``/``columns`` order, and the layer axis range is set explicitly (first row on
    top) on every panel: no panel can map a row label to another layer's values.
    """
    row_of = {r: i for i, r in enumerate(rows)}
    col_of = {c: j for j, c in enumerate(columns)}
    ii = np.fromiter((row_of[r] for r in cells["row"]), dtype=np.int64, count=len(cells))
    jj = np.fromiter((col_of[c] for c in cells["column"]), dtype=np.int64, count=len(cells))
    flat = ii * len(columns) + jj
    _, first = np.unique(flat, return_index=True)
    if len(first) != len(flat):
        twice = cells.iloc[int(np.setdiff1d(np.arange(len(flat)), first)[0])]
        raise ValueError(f"two matrices in one overview cell: {twice['label']} ({twice['matrix']})")
    values = cells["value"].to_numpy(dtype=np.float64)
    z = np.full((len(rows), len(columns)), np.nan)
    z[ii, jj] = values
    digits = ".1f" if metric == "effective_rank" else ".0f"
    shown = np.array([format(v, digits) for v in values], dtype=object)
    cell_px = max(OVERVIEW_CELL_PX[0], min(OVERVIEW_CELL_PX[1], 640 // max(1, len(rows))))
    # A model of one to four layers gets taller cells: the colour bar beside the grid
    # is as tall as the grid, and its tick labels overlapped below about 90 px.
    cell_px = max(cell_px, min(2 * OVERVIEW_CELL_PX[1], math.ceil(OVERVIEW_MIN_GRID_PX / max(1, len(rows)))))
    readable = len(columns) <= OVERVIEW_TEXT_MAX_COLUMNS and cell_px >= OVERVIEW_TEXT_MIN_PX
    fig = go.Figure()
    if readable:
        text = np.full(z.shape, "", dtype=object)
        text[ii, jj] = shown
        style = {"text": text, "texttemplate": "%{text}", "textfont": {"size": 10}}
    else:
        style = {}
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=np.arange(len(columns)),
            y=np.arange(len(rows)),
            coloraxis="coloraxis",
            xgap=1,
            ygap=1,
            hoverinfo="skip",
            **style,
        )
    )
    # Heatmap cells cannot be selected in Plotly, so each cell carries an invisible
    # marker that can: clicking a cell selects it (and shows its hover text).
    name = OVERVIEW_METRICS[metric]
    customdata = np.empty((len(cells), 5), dtype=object)
    customdata[:, 0] = cells["model_index"].to_numpy()
    customdata[:, 1] = cells["matrix"].to_numpy()
    customdata[:, 2] = cells["name"].to_numpy()
    customdata[:, 3] = cells["label"].to_numpy()
    customdata[:, 4] = shown
    fig.add_trace(
        go.Scatter(
            x=jj,
            y=ii,
            mode="markers",
            marker={"symbol": "square", "size": max(cell_px, 10), "opacity": 0},
            customdata=customdata,
            showlegend=False,
            hovertemplate="<b>%{customdata[3]}</b><br>%{customdata[2]}<br>"
            + name
            + ": %{customdata[4]}<extra></extra>",
        )
    )
    col_ticks = list(range(len(columns))) if not experts else _thinned(len(columns))
    row_ticks = _thinned(len(rows))
    longest = max((len(c) for c in columns), default=1)
    bottom = 36 + (int(6.2 * longest * 0.71) if not experts else 0)
    fig.update_xaxes(
        tickvals=col_ticks,
        ticktext=[columns[j] for j in col_ticks],
        tickangle=0 if experts else -45,
        tickfont={"size": 10},
        range=[-0.5, len(columns) - 0.5],
        title_text="expert" if experts else None,
        fixedrange=True,
        showgrid=False,
        zeroline=False,
    )
    fig.update_yaxes(
        tickvals=row_ticks,
        ticktext=[rows[i] for i in row_ticks],
        tickfont={"size": 10},
        range=[len(rows) - 0.5, -0.5],
        autorange=False,
        title_text="layer",
        fixedrange=True,
        showgrid=False,
        zeroline=False,
    )
    fig.update_layout(
        title={
            "text": title,
            "font": {"size": 13},
            "x": 0,
            "xanchor": "left",
            # Just above the grid (not from the top edge, where two lines can be cut off).
            "yref": "paper",
            "y": 1,
            "yanchor": "bottom",
            "pad": {"b": 12},
        },
        coloraxis={
            "colorscale": "Reds" if metric == "intruders" else "Viridis",
            "cmin": 0,
            "cmax": max(zmax, 1),
            "colorbar": {"thickness": 10, "len": 0.9, "outlinewidth": 0, "tickfont": {"size": 9}},
        },
        height=len(rows) * cell_px + 50 + bottom + (14 if experts else 0),
        margin={"t": 50, "b": bottom + (14 if experts else 0), "l": 48, "r": 8},
        hovermode="closest",
        hoverdistance=-1,
        clickmode="event+select",
    )
    return fig


def _short(label: str, most: int = 40) -> str:
    return label if len(label) <= most else label[: most - 1] + "…"


def overview_sections(models: Sequence[ModelResult], metric: str, k: int, eps: float) -> list[OverviewSection]:
    """The overview: every analysed matrix of every fine-tune as one cell of a grid.

    One layer x module grid per stack of the model (encoder, decoder, vision, language;
    a single one for a one-stack model), and one layer x expert grid per mixture-of-
    experts module beside it (the router and any shared expert sit in the module grid).
    Each grid is drawn once per fine-tune, all with the same rows, columns and colour
    scale, from :func:`charts.tables.overview_table`. ``metric`` is ``intruders``
    (count among the top ``k`` tuned vectors at ``eps``, Shuttleworth et al. Def. 3.1),
    ``effective_rank`` or ``rank90`` of the update. Every cell's selectable point has
    ``customdata`` ``[model index, matrix key, tensor name, short label, value]``, so a
    click can open that matrix and its hover names it. No two matrices share a cell.
    """
    if metric not in OVERVIEW_METRICS:
        raise ValueError(f"metric must be one of {sorted(OVERVIEW_METRICS)}, got {metric!r}")
    table = tables.overview_table(models, metric, k, eps)
    if table.empty:
        return []
    zmax = float(table["value"].max())
    labels = tables.model_labels(models)
    everything = tables.identity_order(m for model in models for m in model.matrices)
    stacks = list(dict.fromkeys(m.stack for m in everything))
    modules = tables.module_order(m.module for m in everything)
    order = [(stack, None) for stack in stacks]
    order += [
        (stack, module)
        for stack in stacks
        for module in modules
        if any(m.stack == stack and m.expert is not None and m.module == module for m in everything)
    ]
    order.sort(key=lambda s: stacks.index(s[0]))  # each stack's expert grids right after its module grid
    sections = []
    for section in order:
        title = tables.section_title(section)
        part = table[table["section"] == title]
        experts = section[1] is not None
        rows = sorted(part["row"].unique(), key=_layer_sort)
        if experts:
            columns = sorted(part["column"].unique(), key=int)
        else:
            columns = tables.module_order(part["column"])
        panels, indices = [], []
        for index, label in enumerate(labels):
            cells = part[part["model_index"] == index]
            if cells.empty:
                continue
            method = tables.training_method(models[index])
            note = "" if tables.names_method(label, method) else f"<br><sup>{method}</sup>"
            panel_title = f"{_short(label)}{note}"
            panels.append(
                _overview_panel(cells, rows, columns, experts=experts, metric=metric, zmax=zmax, title=panel_title)
            )
            indices.append(index)
        width = 3 if len(columns) <= OVERVIEW_TEXT_MAX_COLUMNS else (2 if len(columns) <= 40 else 1)
        sections.append(OverviewSection(title, panels, indices, max(1, min(width, len(panels)))))
    return sections


def overview_title(metric: str, k: int, eps: float) -> str:
    """The overview's heading for ``metric`` (with k and eps for intruder counts)."""
    return OVERVIEW_METRICS[metric] + (f" (top {k}, ε = {eps:g})" if metric == "intruders" else "")


def totals_figure(models: Sequence[ModelResult], k: int, eps: float) -> go.Figure:
    """Per-model total intruder dimensions at (k, eps), coloured by fine-tune."""
    table = tables.totals_table(models, k, eps)
    # Short first line (a phone cut the long one), the settings below it.
    title = f"Intruder dimensions per fine-tune<br><sup>top {k}, ε = {eps:g}, summed over every matrix</sup>"
    if table.empty:
        return _empty(title, "No fine-tunes analysed yet")
    fig = go.Figure()
    for index, (model, row) in enumerate(zip(models, table.itertuples(), strict=True)):
        fig.add_trace(
            go.Bar(
                x=[row.model],
                y=[row.intruders],
                name=_legend_name(row.model, model),
                text=[row.intruders],
                textposition="outside",
                marker_color=_model_style(index, model)["color"],
                marker_pattern_shape="/" if tables.is_lora(model) else "",
                hovertemplate=f"{row.model}<br>{row.method}<br>{row.intruders} intruders over "
                f"{row.matrices} matrices<extra></extra>",
            )
        )
    fig.update_layout(title=title, yaxis_title="intruder dimensions", showlegend=True, height=360)
    return fig


def similarity_figure(matrix: MatrixResult, k: int, eps: float, label: str = "") -> go.Figure:
    """``|Ut^T U0|`` heatmap for one matrix, with each tuned vector's best match beside it.

    Left: the top-N by top-N similarity block (Shuttleworth et al. Fig. 1/3; rows tuned
    rank, columns base rank), reduced to :data:`MAX_HEATMAP_SIDE` by block maxima.
    Right: ``score_j = max_i |<Ut[:, j], U0[:, i]>|`` over **all** base vectors for the
    top ``k`` tuned vectors, with the ``eps`` line; intruders (``score_j < eps``) are red
    in both panels. The heatmap follows ``k``: its top ``max(k, 10)`` ranks, up to the
    ``N`` the engine keeps (``AnalysisSettings.similarity_size``).
    """
    full = np.asarray(matrix.similarity, dtype=np.float64)
    n = min(max(k, 10), full.shape[0])
    sim = full[:n, : min(n, full.shape[1])]
    z, block = reduce_heatmap(sim)
    intr = tables.intruder_table(matrix, k, eps)
    n_rows = max(sim.shape[0], len(intr))
    reduced = f" (max over {block}×{block} blocks)" if block > 1 else ""
    fig = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        column_widths=[0.72, 0.28],
        horizontal_spacing=0.04,
        subplot_titles=[
            f"|Uₜᵀ U₀|, top {sim.shape[0]} × {sim.shape[1]}{reduced}",
            f"best |cos|, top {len(intr)}",
        ],
    )
    fig.add_trace(
        _rank_heatmap(
            z,
            block,
            colorscale="Blues",
            # Below the panels and their axis titles (placed in the figure's own
            # coordinates, so it never sits on them), so narrow screens keep the width
            # for the heatmap.
            colorbar={
                "title": {"text": "|cos|", "side": "right"},
                "orientation": "h",
                "yref": "container",
                "y": 0.02,
                "yanchor": "bottom",
                "len": 0.5,
                "thickness": 10,
            },
            hovertemplate="tuned rank %{y}<br>base rank %{x}<br>|cos| = %{z:.3f}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    is_intruder = intr["intruder"].to_numpy()
    rows_intr = intr[is_intruder]
    if len(rows_intr):
        fig.add_trace(
            go.Scatter(
                x=np.full(len(rows_intr), 0.0),
                y=rows_intr["tuned_rank"],
                mode="markers",
                marker={"symbol": "triangle-right", "size": 12, "color": INTRUDER_COLOR},
                name="intruder",
                hovertemplate="tuned rank %{y}: intruder<extra></extra>",
            ),
            row=1,
            col=1,
        )
    fig.add_trace(
        go.Bar(
            x=intr["best_match_score"],
            y=intr["tuned_rank"],
            orientation="h",
            name="best match",
            marker_color=np.where(is_intruder, INTRUDER_COLOR, "#4c78a8").tolist(),
            customdata=intr["best_match_base_rank"],
            showlegend=False,
            hovertemplate="tuned rank %{y}<br>best match %{x:.3f} (base rank %{customdata})<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.add_vline(
        x=eps,
        line_dash="dash",
        line_color=INTRUDER_COLOR,
        row=1,
        col=2,
    )
    fig.update_yaxes(range=[n_rows + 0.5, 0.5], title_text="tuned singular vector (rank)", row=1, col=1)
    fig.update_xaxes(range=[-0.5, sim.shape[1] + 0.5], title_text="base singular vector (rank)", row=1, col=1)
    # The bars fill the panel: the dashed ε line is named in the axis title, not over a bar.
    fig.update_xaxes(range=[0, 1.05], title_text=f"max |cos|<br>(ε = {eps:g})", row=1, col=2)
    n_intr = int(is_intruder.sum())
    fig.update_layout(
        # The count before the (long) tensor name: a phone's width cuts the end of the line.
        title=f"{label + ': ' if label else ''}{matrix.short_label}<br><sup>{n_intr} intruder"
        f"{'s' if n_intr != 1 else ''} in the top {len(intr)} at ε = {eps:g} · {matrix.name}</sup>",
        height=max(460, min(940, 12 * n_rows + 200)),
        showlegend=False,
        margin={"b": 120},
    )
    return fig


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
    """
    table = tables.sweep_table(models, k, epsilons, matrices)
    title = f"Intruder dimensions vs ε (top {k})"
    if table.empty:
        return _empty(title, "No fine-tunes analysed yet")
    fig = go.Figure()
    for index, (label, model) in enumerate(zip(tables.model_labels(models), models, strict=True)):
        rows = table[table["model"] == label]
        style = _series_style(index, model)
        fig.add_trace(
            go.Scatter(
                x=rows["epsilon"],
                y=rows["intruders"],
                mode="lines+markers",
                name=_legend_name(label, model),
                line={"color": style["color"], "dash": style["dash"], "width": style["width"]},
                marker={"symbol": style["symbol"], "size": style["size"], "line": {"width": 1}},
                hovertemplate=f"{label}<br>ε = %{{x:.2f}}: %{{y}} intruders<extra></extra>",
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
        yaxis={"title": "intruder dimensions", "range": [-0.04 * max(top, 5), 1.08 * max(top, 5)]},
        height=440,
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def breakdown_figure(
    models: Sequence[ModelResult], k: int, eps: float, by: str, matrices: Collection[str] | None = None
) -> go.Figure:
    """Intruder counts at (k, eps) per layer or per module, grouped bars per fine-tune."""
    table = tables.breakdown_table(models, k, eps, by, matrices)
    title = f"Intruder dimensions by {by} (top {k}, ε = {eps:g})"
    if table.empty:
        return _empty(title, "No matrices analysed yet")
    order = (
        tables.module_order(table["module"])
        if by == "module"
        else sorted(table["layer"].unique(), key=lambda s: (s == "other", int(s) if s.isdigit() else 0))
    )
    fig = go.Figure()
    for index, (label, model) in enumerate(zip(tables.model_labels(models), models, strict=True)):
        rows = table[table["model"] == label].set_index(by).reindex(order)
        fig.add_trace(
            go.Bar(
                x=order,
                y=rows["intruders"].fillna(0),
                name=_legend_name(label, model),
                marker_color=_model_style(index, model)["color"],
                marker_pattern_shape="/" if tables.is_lora(model) else "",
            )
        )
    fig.update_layout(
        title=title,
        barmode="group",
        xaxis={"title": by, "type": "category"},
        yaxis_title="intruder dimensions",
        height=380,
    )
    return fig


def _facets(table) -> list[tuple[str | None, str, bool]]:
    """The facets of a per-matrix table: ``(stack, module, experts)``, stacks as first met,
    modules in block order, an expert module's facet after the module's own."""
    stacks = list(dict.fromkeys(None if pd.isna(s) else s for s in table["stack"]))
    modules = tables.module_order(table["module"])
    found = {
        (None if pd.isna(s) else s, m, not pd.isna(e))
        for s, m, e in zip(table["stack"], table["module"], table["expert"], strict=True)
    }
    return sorted(found, key=lambda f: (stacks.index(f[0]), modules.index(f[1]), f[2]))


def _facet_title(facet: tuple[str | None, str, bool]) -> str:
    stack, module, experts = facet
    what = f"experts of {module}" if experts else module
    return f"{stack} · {what}" if stack else what


def _in_facet(rows, facet: tuple[str | None, str, bool]):
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
    """``column`` by layer, one facet per stack and module (wrapping after ``max_cols``),
    one series per fine-tune with its own colour, dash and marker; hover names the matrix
    by its short label (``decoder L3 cross_attn_out``, ``L3 E17 down``).

    Every matrix is its own point: an encoder's and a decoder's layer 0 are in different
    facets (``encoder · query``, ``decoder · query``), and the experts of a mixture-of-
    experts module get a facet of their own (``experts of down``) where each expert is one
    marker at its layer (no line: many points share a layer). ``rank_lines`` adds a dotted
    line at each LoRA's rank ``r``."""
    facets = _facets(table)
    layers = sorted(table["layer"].unique(), key=lambda s: (s == "other", int(s) if s.isdigit() else 0))
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
        style = _series_style(index, model)
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
                    mode="markers" if facet[2] else _series_mode(len(sub)),
                    name=_legend_name(label, model),
                    legendgroup=label,
                    showlegend=pos == 0,
                    customdata=list(sub["label"]),
                    line={"color": style["color"], "dash": style["dash"], "width": style["width"]},
                    marker={
                        "symbol": style["symbol"],
                        "size": style["size"] - (4 if facet[2] else 2),
                        "color": style["color"],
                        "opacity": 0.7 if facet[2] else 1.0,  # experts at one layer overlap
                    },
                    hovertemplate=f"{label}<br>%{{customdata}}<br>{name}: %{{y:.3g}}<extra></extra>",
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
        fig.update_yaxes(**_log_axis(values))
    else:
        fig.update_yaxes(rangemode="tozero")
    fig.update_yaxes(title_text=name, col=1)
    fig.update_annotations(font_size=12)
    height = 120 + 260 * n_rows
    fig.update_layout(height=height, legend={"orientation": "h", "y": -80 / (height - 100)})
    return fig


def effective_rank_figure(
    models: Sequence[ModelResult], metric: str = "effective_rank", log_y: bool = True
) -> go.Figure:
    """Effective rank or rank90 of every update by layer, one facet per stack and module
    (experts of a module in a facet of their own, one marker each).

    All fine-tunes side by side, each with its own colour, dash and marker; the LoRA
    rank ``r`` (the most a LoRA update's rank can be) as a dotted line. ``log_y`` (the
    default) keeps rank-1 and rank-8 updates readable beside a full fine-tune's hundreds.
    Effective rank: Roy & Vetterli 2007 on ``dW`` as in Shuttleworth et al.; rank90:
    Biderman et al. 2024.
    """
    if metric not in ("effective_rank", "rank90"):
        raise ValueError(f"metric must be 'effective_rank' or 'rank90', got {metric!r}")
    name = OVERVIEW_METRICS[metric]
    table = tables.matrix_table(models)
    if table.empty:
        return _empty(name, "No matrices analysed yet")
    fig = _module_facets(models, table, metric, name, log_y=log_y, rank_lines=True)
    fig.update_layout(title=f"{name}<br><sup>by layer, stack and module; dotted: LoRA rank r</sup>")
    return fig


_LOG_TICKS = [m * 10**e for e in range(7) for m in (1, 2, 5)]


def _rank_axis(n_max: int) -> dict:
    """A log x axis of singular-value ranks 1..``n_max`` with plain 1-2-5 tick labels."""
    ticks = [t for t in _LOG_TICKS if t <= n_max]
    return {
        "title": "rank",
        "type": "log",
        "tickvals": ticks,
        "ticktext": [str(t) for t in ticks],
        "range": [-0.05, math.log10(n_max * 1.1)],
    }


def _log_sample(n: int, keep: Sequence[int], max_points: int = MAX_SPECTRUM_POINTS) -> np.ndarray:
    """Indices ``0..n-1`` thinned log-evenly to about ``max_points``, ``keep`` always in."""
    if n <= max_points:
        return np.arange(n)
    idx = np.unique(np.round(np.geomspace(1, n, max_points)).astype(np.int64) - 1)
    return np.union1d(idx, np.asarray(list(keep), dtype=np.int64))


def spectrum_figure(matrix: MatrixResult, k: int, eps: float, label: str = "") -> go.Figure:
    """Singular values of base, tuned and update for one matrix on log scales.

    The base is a thick dashed grey line drawn over the tuned one (solid blue), so where
    fine-tuning left the spectrum alone both still show; a series with one point (the
    update of a rank-1 LoRA) is a marker. Intruder dimensions among the top ``k`` tuned
    vectors (Shuttleworth et al. Def. 3.1) are marked on the tuned spectrum at the rank
    where they sit.
    """
    spectrum = tables.spectrum_table(matrix)
    intr = tables.intruder_table(matrix, k, eps)
    intruder_ranks = intr.loc[intr["intruder"], "tuned_rank"].to_numpy()
    fig = go.Figure()
    lines = (
        ("tuned", "Wₜ (tuned)", "#1f77b4", "solid", 2.0, "circle"),
        ("base", "W₀ (base)", "#8c8c8c", "dash", 3.0, "square"),
        ("update", "ΔW (update)", "#ff7f0e", "dot", 2.5, "diamond"),
    )
    shown = []
    for column, name, color, dash, width, symbol in lines:
        values = spectrum[column].to_numpy()
        n = int(np.count_nonzero(~np.isnan(values)))
        idx = _log_sample(n, intruder_ranks - 1 if column == "tuned" else [])
        values = values[idx]
        positive = values > 0
        shown.extend(values[positive].tolist())
        fig.add_trace(
            go.Scatter(
                x=idx[positive] + 1,
                y=values[positive],
                mode=_series_mode(int(positive.sum())),
                name=name,
                line={"color": color, "dash": dash, "width": width},
                marker={"color": color, "symbol": symbol, "size": 10 if positive.sum() <= 1 else 6},
                opacity=0.9,
                hovertemplate=f"{name}<br>rank %{{x}}: σ = %{{y:.4g}}<extra></extra>",
            )
        )
    if len(intruder_ranks):
        rows = intr[intr["intruder"]]
        fig.add_trace(
            go.Scatter(
                x=rows["tuned_rank"],
                y=rows["singular_value"],
                mode="markers+text",
                name=f"intruder (ε = {eps:g})",
                marker={"symbol": "x", "size": 13, "color": INTRUDER_COLOR, "line": {"width": 2}},
                text=[f"#{r}" for r in rows["tuned_rank"]],
                textposition="top right",
                customdata=np.stack([rows["best_match_score"], rows["best_match_base_rank"]], axis=1),
                hovertemplate="intruder at tuned rank %{x}<br>σ = %{y:.4g}<br>best match %{customdata[0]:.3f} "
                "(base rank %{customdata[1]})<extra></extra>",
            )
        )
    n_intr = len(intruder_ranks)
    n_max = max(len(spectrum), 1)
    fig.update_layout(
        # Short first line (narrow screens), details below it.
        # The count before the (long) tensor name: a phone's width cuts the end of the line.
        title=f"{label + ': ' if label else ''}{matrix.short_label}<br><sup>{n_intr} intruder"
        f"{'s' if n_intr != 1 else ''} in the top {len(intr)} at ε = {eps:g} · {matrix.name}</sup>",
        xaxis=_rank_axis(n_max),
        yaxis=_log_axis(shown, title="singular value"),
        height=460,
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def _integer_ticks(n: int, most: int = 10) -> list[int]:
    """Ticks 1, step+1, ... up to ``n`` (no fractional ranks on short axes)."""
    step = max(1, math.ceil(n / most))
    return list(range(1, n + 1, step))


def subspace_figure(phi: np.ndarray, label_a: str, label_b: str, matrix_name: str) -> go.Figure:
    """Heatmap of ``phi(i, j)`` (Hu et al. 2021, eq. 4) between two updates of a matrix.

    ``phi(i, j) = ||P_i^T Q_j||_F^2 / min(i, j)`` over the left singular vectors of each
    update ``dW`` (rows: the first update's top ``i``; columns: the second's top ``j``).
    """
    # Short first line (a phone cuts a long one); the tensor name below it.
    title = f"Subspace similarity φ(i, j) of ΔW<br><sup>{matrix_name}</sup>"
    if phi.size == 0:
        return _empty(title, "One of the two updates is zero: no subspace to compare")
    z, block = reduce_heatmap(phi)
    fig = go.Figure(
        _rank_heatmap(
            z,
            block,
            colorscale="Viridis",
            colorbar={"title": "φ"},
            hovertemplate=f"i = %{{y}} ({label_a})<br>j = %{{x}} ({label_b})<br>φ = %{{z:.3f}}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title.replace("</sup>", " · left singular vectors of ΔW</sup>"),
        xaxis={"title": f"j: top-j directions of {label_b}", "tickvals": _integer_ticks(phi.shape[1])},
        yaxis={
            "title": f"i: top-i directions of {label_a}",
            "autorange": "reversed",
            "tickvals": _integer_ticks(phi.shape[0]),
        },
        height=max(380, min(720, 14 * phi.shape[0] + 160)),
    )
    return fig


def amplification_figure(
    models: Sequence[ModelResult], matrices: Collection[str] | None = None, log_y: bool = True
) -> go.Figure:
    """Amplification factor per matrix (Hu et al. 2021, sec. 7.3) by layer, one facet per
    stack and module (experts in their own facet, one marker each) and one series per
    fine-tune (every fine-tune in the legend), every matrix its own point, named by its
    short label (``L3 mlp_in``) in the hover."""
    table = tables.amplification_table(models, matrices)
    title = "Amplification factor<br><sup>‖ΔW‖_F / ‖Uᵀ W₀ V‖_F by layer, stack and module</sup>"
    if table.empty:
        return _empty(title, "No matrices analysed yet")
    fig = _module_facets(models, table, "amplification_factor", "amplification factor", log_y=log_y)
    fig.update_layout(title=title)
    return fig


# -- checkpoint series (analysis.specs.series) ------------------------------------------------------
def _step_slider(steps: Sequence[int], active: int, prefix: str = "step ") -> dict:
    """A Plotly slider whose positions show the frames named after ``steps``."""
    return {
        "active": active,
        "currentvalue": {"prefix": prefix},
        "pad": {"t": 40},
        "steps": [
            {
                "label": str(step),
                "method": "animate",
                "args": [[str(step)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True}}],
            }
            for step in steps
        ],
    }


def _series_title(label: str, what: str) -> str:
    """The series' name over a smaller line saying what is drawn (fits a phone's width)."""
    return f"{label}<br><sup>{what}</sup>" if label else what


def _play_button() -> dict:
    return {
        "type": "buttons",
        "showactive": False,
        "x": 0,
        "y": -0.08,
        "xanchor": "right",
        "yanchor": "top",
        "buttons": [
            {
                "label": "▶",
                "method": "animate",
                "args": [None, {"frame": {"duration": 600, "redraw": True}, "fromcurrent": True}],
            }
        ],
    }


def series_trend_figure(table, by: str = "model", label: str = "") -> go.Figure:
    """Intruders, effective rank, rank90 and ``||dW||_F`` of a series against training step.

    ``table`` is :func:`charts.tables.series_table`; one line per group (the whole
    model, a layer, a module kind or a matrix), the same colour in all four panels.
    Intruders appear and grow with training (Shuttleworth et al. 2024, sec. 5); the
    update's rank grows with data (Biderman et al. 2024, Fig. 6).
    """
    if table.empty:
        return _empty("Checkpoint series", "No checkpoint has results yet.")
    names = list(tables.SERIES_METRICS)
    fig = make_subplots(
        rows=2, cols=2, shared_xaxes=True, vertical_spacing=0.12, subplot_titles=list(tables.SERIES_METRICS.values())
    )
    groups = list(dict.fromkeys(table["group"]))
    for g, group in enumerate(groups):
        rows = table[table["group"] == group].sort_values("step")
        color = PALETTE[g % len(PALETTE)]
        for i, metric in enumerate(names):
            fig.add_trace(
                go.Scatter(
                    x=rows["step"],
                    y=rows[metric],
                    mode="lines+markers",
                    name=group,
                    legendgroup=group,
                    showlegend=i == 0,
                    line={"color": color},
                    hovertemplate=f"{group}<br>step %{{x}}<br>{metric} = %{{y:.4g}}<extra></extra>",
                ),
                row=i // 2 + 1,
                col=i % 2 + 1,
            )
    fig.update_xaxes(title_text="training step", row=2)
    grouping = {"model": "whole model", "layer": "per layer", "module": "per module", "matrix": "per matrix"}
    fig.update_layout(
        title=_series_title(label, f"the update against training step ({grouping.get(by, by)})"),
        height=620,
        legend={"orientation": "h", "y": -0.15},
        margin={"t": 90},
    )
    return fig


def series_grid_figure(table, metric: str, label: str = "", step: int | None = None) -> go.Figure:
    """The overview's grids of ``metric`` with one animation frame per training step.

    ``table`` is :func:`charts.tables.series_grid_table`: one layer x module grid per stack
    and one layer x expert grid per mixture-of-experts module (the overview's convention,
    :func:`overview_sections`), stacked top to bottom; every matrix is one cell of its grid
    and no cell holds two. The colour scale is shared by every grid and step, so colours
    compare across the slider; it opens at ``step`` (the last step when ``None`` or not
    among the table's). Hover names the matrix.
    """
    if table.empty:
        return _empty("Checkpoint series", "No checkpoint has results yet.")
    steps = sorted(table["step"].unique().tolist())
    sections = list(dict.fromkeys(table["section"]))
    shapes = {}
    for section in sections:
        part = table[table["section"] == section]
        rows = sorted(part["row"].unique(), key=_layer_sort)
        experts = part["expert"].notna().all()
        columns = sorted(part["column"].unique(), key=int) if experts else tables.module_order(part["column"])
        shapes[section] = (rows, columns)
    twice = table.duplicated(["step", "section", "row", "column"])
    if twice.any():
        first = table[twice].iloc[0]
        raise ValueError(f"two matrices in one series grid cell: {first['label']} ({first['matrix']})")
    values = table[metric].astype(float)
    zmin, zmax = (
        (0.0, max(1.0, float(values.max()))) if metric == "intruders" else (float(values.min()), float(values.max()))
    )
    title = tables.SERIES_METRICS[metric]

    def heatmaps(step: int) -> list[go.Heatmap]:
        now = table[table["step"] == step]
        out = []
        for n, section in enumerate(sections):
            rows, columns = shapes[section]
            cells = now[now["section"] == section]
            z = np.full((len(rows), len(columns)), np.nan)
            text = np.full(z.shape, "", dtype=object)
            ii = [rows.index(r) for r in cells["row"]]
            jj = [columns.index(c) for c in cells["column"]]
            z[ii, jj] = cells[metric].to_numpy(dtype=float)
            text[ii, jj] = cells["label"].to_numpy()
            out.append(
                go.Heatmap(
                    z=z,
                    x=columns,
                    y=rows,
                    customdata=text,
                    coloraxis="coloraxis",
                    xgap=1,
                    ygap=1,
                    xaxis=f"x{n + 1 if n else ''}",
                    yaxis=f"y{n + 1 if n else ''}",
                    hovertemplate=f"%{{customdata}}<br>{metric} = %{{z:.4g}}<extra>step {step}</extra>",
                )
            )
        return out

    active = steps.index(step) if step in steps else len(steps) - 1
    # Pixels: each grid 28 per layer (at least 60), 70 between grids for ticks and a title.
    panels = [max(60, 28 * len(shapes[s][0])) for s in sections]
    gap = 70
    plot_px = sum(panels) + gap * (len(sections) - 1)
    fig = make_subplots(
        rows=len(sections),
        cols=1,
        subplot_titles=sections if len(sections) > 1 else None,
        row_heights=panels,
        vertical_spacing=gap / plot_px if len(sections) > 1 else 0.0,
    )
    for n, trace in enumerate(heatmaps(steps[active])):
        fig.add_trace(trace, row=n + 1, col=1)
    fig.frames = [go.Frame(data=heatmaps(s), traces=list(range(len(sections))), name=str(s)) for s in steps]
    fig.update_yaxes(title_text="layer", autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    for n, section in enumerate(sections):
        if section.endswith("layer × expert"):
            fig.update_xaxes(title_text="expert", title_standoff=4, row=n + 1, col=1)
    fig.update_annotations(font_size=12)
    fig.update_layout(
        title=_series_title(label, f"{title} per layer and module, by step"),
        coloraxis={"colorscale": "Reds" if metric == "intruders" else "Viridis", "cmin": zmin, "cmax": zmax,
                   "colorbar": {"title": metric}},
        margin={"t": 100, "b": 150},
        height=plot_px + 250,
        sliders=[_step_slider(steps, active)],
        updatemenus=[_play_button()],
    )  # fmt: skip
    return fig


def series_similarity_figure(
    models: Sequence[ModelResult], matrix: str, label: str = "", step: int | None = None
) -> go.Figure:
    """``|Ut^T U0|`` of one matrix (its :func:`charts.tables.matrix_key`) at each checkpoint
    of a series, one frame per step, opening at ``step`` (the last when ``None`` or absent).

    The similarity block of :func:`similarity_figure` (Shuttleworth et al. 2024, Fig. 1/3;
    rows tuned rank, columns base rank), reduced to :data:`MAX_HEATMAP_SIDE`; the slider
    shows how the tuned singular vectors drift away from the base ones as training goes on.
    """
    found = [
        (model.step, m) for model in tables.by_step(models) for m in model.matrices if tables.matrix_key(m) == matrix
    ]
    if not found:
        return _empty("Similarity across steps", f"No checkpoint has results for {matrix} yet.")
    steps = [step for step, _ in found]

    def heatmap(step: int, matrix: MatrixResult) -> go.Heatmap:
        z, block = reduce_heatmap(np.asarray(matrix.similarity, dtype=np.float64))
        return _rank_heatmap(
            z,
            block,
            colorscale="Blues",
            colorbar={"title": "|cos|"},
            hovertemplate=f"step {step}<br>tuned rank %{{y}}<br>base rank %{{x}}<br>|cos| = %{{z:.3f}}<extra></extra>",
        )

    active = steps.index(step) if step in steps else len(steps) - 1
    first = found[active][1]
    fig = go.Figure(
        data=[heatmap(*found[active])], frames=[go.Frame(data=[heatmap(s, m)], name=str(s)) for s, m in found]
    )
    n = first.similarity.shape[0]
    fig.update_yaxes(title_text="tuned singular vector (rank)", range=[n + 0.5, 0.5])
    fig.update_xaxes(title_text="base singular vector (rank)", range=[0.5, first.similarity.shape[1] + 0.5])
    fig.update_layout(
        title=_series_title(label, f"{first.short_label}: |Uₜᵀ U₀| by training step"),
        margin={"t": 90},
        height=560,
        sliders=[_step_slider(steps, active)],
        updatemenus=[_play_button()],
    )
    return fig
