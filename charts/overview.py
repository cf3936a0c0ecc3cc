"""The Overview page's charts.

Every analysed matrix of every fine-tune as a grid cell, and the total intruder
dimensions per fine-tune.

Pure functions (no Streamlit, no I/O), drawn from :func:`charts.overview_tables.overview_table`
and :func:`charts.tables.totals_table`, which are also what the page offers as CSV.

References: intruder dimensions, Shuttleworth et al. 2024 (arXiv:2410.21228, Def. 3.1);
effective rank, Roy & Vetterli 2007; rank90, Biderman et al. 2024 (arXiv:2405.09673).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from analysis.results import ModelResult
from charts import overview_tables, rl_tables, tables
from charts.colors import GRID_BAR_PX, cell_text, count_ticks, grid_colorbar, slanted_px
from charts.style import (
    chart_text,
    empty_figure,
    layer_sort,
    legend_name,
    metric_colorscale,
    model_style,
    thinned,
)
from charts.table_words import MEASURES


@dataclass(frozen=True)
class OverviewSection:
    """One grid of the overview, drawn once per fine-tune with the same rows and columns.

    ``title`` names the grid (:func:`charts.overview_tables.section_title`), ``panels`` holds one
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
OVERVIEW_CELL_PX = (7, 32)
#: The least height of a grid's cells (and so of its colour bar), in pixels.
OVERVIEW_MIN_GRID_PX = 120
#: Cell text only where a cell can hold it: at most this many columns, cells this high.
OVERVIEW_TEXT_MAX_COLUMNS = 12
OVERVIEW_TEXT_MIN_PX = 14
#: At most this many tick labels on the layer and expert axes (every module is named).
OVERVIEW_MAX_TICKS = 25


def _cell_positions(cells, rows: list[str], columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column index of each cell of ``cells`` in the ``rows`` x ``columns`` grid.

    Raises ``ValueError`` when two matrices land in one cell.
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
    return ii, jj


def _cell_px(n_rows: int) -> int:
    """How many pixels high a grid's cells are, from its number of rows (layers)."""
    cell_px = max(OVERVIEW_CELL_PX[0], min(OVERVIEW_CELL_PX[1], 640 // max(1, n_rows)))
    # A model of one to four layers gets taller cells: the colour bar beside the grid
    # is as tall as the grid, and its tick labels overlapped below about 90 px.
    return max(cell_px, min(2 * OVERVIEW_CELL_PX[1], math.ceil(OVERVIEW_MIN_GRID_PX / max(1, n_rows))))


def _panel_heatmap(z: np.ndarray) -> go.Heatmap:
    """The grid's colours on integer coordinates (row ``i``, column ``j``)."""
    return go.Heatmap(
        z=z,
        x=np.arange(z.shape[1]),
        y=np.arange(z.shape[0]),
        coloraxis="coloraxis",
        xgap=1,
        ygap=1,
        hoverinfo="skip",
    )


def cell_label(value: float, metric: str) -> str:
    """A cell's value as written in the cell: short enough for a narrow cell.

    Counts as integers; other measures as integers from 10 up (``228.6`` filled a 26 px
    cell edge to edge; ``229`` does not), with one decimal from 1 to 10, with two below 1
    (the shares and fractions of the RL-versus-SFT measures: ``0.04``, not ``0.0``) and as
    ``5e-3`` below 0.01; zero as ``0``. The hover keeps every digit.

    Parameters
    ----------
    value : float
        The cell's value.
    metric : str
        One of :data:`charts.overview_tables.OVERVIEW_METRICS`.

    Returns
    -------
    str
        At most four characters from 1e-9 up to 9999; a dash where there is no value.
    """
    if not math.isfinite(value):
        return "–"
    if metric == "intruders" or abs(value) >= 10 or value == 0:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.1f}"
    if abs(value) >= 0.0095:  # what rounds to 0.01 is written so, not "1e-2"
        return f"{value:.2f}"
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def color_top(metric: str, zmax: float) -> float:
    """The top of a grid's colour axis, from the largest value ``zmax`` of all its panels.

    The RL-versus-SFT measures span their own values (a mask overlap of 0.04, an angle of
    90°); counts and ranks reach at least 1. The colour bar and the colour of each cell's
    text are computed with this one top.
    """
    if metric in rl_tables.RL_METRICS and zmax > 0:
        return zmax
    return max(zmax, 1) if math.isfinite(zmax) else 1.0


def _panel_points(cells, ii: np.ndarray, jj: np.ndarray, shown: np.ndarray, cell_px: int, metric: str) -> go.Scatter:
    """One invisible, selectable marker per cell, carrying the matrix it stands for.

    Heatmap cells cannot be selected in Plotly, so each cell carries an invisible marker
    that can: clicking a cell selects it (and shows its hover text).
    """
    name = overview_tables.OVERVIEW_METRICS[metric]
    customdata = np.empty((len(cells), 5), dtype=object)
    customdata[:, 0] = cells["model_index"].to_numpy()
    customdata[:, 1] = cells["matrix"].to_numpy()
    customdata[:, 2] = [chart_text(name) for name in cells["name"]]  # shown in the hover
    customdata[:, 3] = [chart_text(label) for label in cells["label"]]
    customdata[:, 4] = shown
    return go.Scatter(
        x=jj,
        y=ii,
        mode="markers",
        marker={"symbol": "square", "size": max(cell_px, 10), "opacity": 0},
        customdata=customdata,
        showlegend=False,
        hovertemplate="<b>%{customdata[3]}</b><br>%{customdata[2]}<br>" + name + ": %{customdata[4]}<extra></extra>",
    )


def _panel_axes(fig: go.Figure, rows: list[str], columns: list[str], experts: bool) -> None:
    """Ticks at the grid's rows (layers, first on top) and columns (modules or experts)."""
    col_ticks = list(range(len(columns))) if not experts else thinned(len(columns), OVERVIEW_MAX_TICKS)
    row_ticks = thinned(len(rows), OVERVIEW_MAX_TICKS)
    fig.update_xaxes(
        tickvals=col_ticks,
        ticktext=[chart_text(columns[j]) for j in col_ticks],
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
        ticktext=[chart_text(rows[i]) for i in row_ticks],
        tickfont={"size": 10},
        range=[len(rows) - 0.5, -0.5],
        autorange=False,
        title_text="layer",
        fixedrange=True,
        showgrid=False,
        zeroline=False,
    )


def _panel_layout(
    fig: go.Figure, columns: list[str], *, height: int, experts: bool, metric: str, zmax: float, title: str
) -> None:
    """Title, colour scale, size and click behaviour of a panel ``height`` pixels of grid high."""
    longest = max((len(c) for c in columns), default=1)
    # Under the grid: its slanted module names, or an expert grid's numbers and axis title; then the colour bar.
    below = 36 + (slanted_px(longest) if not experts else 14)
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
            "colorscale": metric_colorscale(metric),
            "cmin": 0,
            "cmax": color_top(metric, zmax),
            "colorbar": grid_colorbar(
                MEASURES[metric].title(),
                height,
                below,
                font_size=10,
                **(count_ticks(max(zmax, 1)) if metric == "intruders" else {}),
            ),
        },
        height=height + 50 + below + GRID_BAR_PX,
        margin={"t": 50, "b": below + GRID_BAR_PX, "l": 48, "r": 8},
        hovermode="closest",
        hoverdistance=-1,
        clickmode="event+select",
    )


def _overview_panel(
    cells, rows: list[str], columns: list[str], *, experts: bool, metric: str, zmax: float, title: str
) -> go.Figure:
    """One fine-tune's grid: a heatmap and, on the same cells, one selectable point each.

    Both traces are placed on integer coordinates (row ``i``, column ``j``) from the one
    ``rows``/``columns`` order, and the layer axis range is set explicitly (first row on
    top) on every panel: no panel can map a row label to another layer's values.
    """
    ii, jj = _cell_positions(cells, rows, columns)
    measure = MEASURES[metric]
    stored = cells["value"].to_numpy(dtype=np.float64)
    values = measure.shown(stored)  # in the measure's unit (a sparsity in %), as every view shows it
    z = np.full((len(rows), len(columns)), np.nan)
    z[ii, jj] = values
    shown = np.array([measure.text(v) for v in stored], dtype=object)
    cell_px = _cell_px(len(rows))
    readable = len(columns) <= OVERVIEW_TEXT_MAX_COLUMNS and cell_px >= OVERVIEW_TEXT_MIN_PX
    fig = go.Figure()
    fig.add_trace(_panel_heatmap(z))
    if readable:
        texts = [cell_label(v, metric) for v in values]
        scale = metric_colorscale(metric)
        fig.add_trace(cell_text(jj, ii, texts, values, scale, 0.0, color_top(metric, zmax), size=10))
    fig.add_trace(_panel_points(cells, ii, jj, shown, cell_px, metric))
    _panel_axes(fig, rows, columns, experts)
    _panel_layout(fig, columns, height=len(rows) * cell_px, experts=experts, metric=metric, zmax=zmax, title=title)
    return fig


def _short(label: str, most: int = 40) -> str:
    """``label`` cut to ``most`` characters (with an ellipsis)."""
    return label if len(label) <= most else label[: most - 1] + "…"


def overview_sections(models: Sequence[ModelResult], metric: str, k: int, eps: float) -> list[OverviewSection]:
    """The overview: every analysed matrix of every fine-tune as one cell of a grid.

    One layer x module grid per stack of the model (encoder, decoder, vision, language;
    a single one for a one-stack model), and one layer x expert grid per mixture-of-
    experts module beside it (the router and any shared expert sit in the module grid).
    Each grid is drawn once per fine-tune, all with the same rows, columns and colour
    scale, from :func:`charts.overview_tables.overview_table`. ``metric`` is ``intruders``
    (count among the top ``k`` tuned vectors at ``eps``, Shuttleworth et al. Def. 3.1),
    ``effective_rank`` or ``rank90`` of the update. Every cell's selectable point has
    ``customdata`` ``[model index, matrix key, tensor name, short label, value]``, so a
    click can open that matrix and its hover names it. No two matrices share a cell.

    Parameters
    ----------
    models : sequence of ModelResult
        The fine-tunes, in the order they are drawn.
    metric : str
        One of :data:`charts.overview_tables.OVERVIEW_METRICS`.
    k : int
        How many top tuned singular vectors are searched for intruders.
    eps : float
        The threshold on the best match below which a tuned vector is an intruder.

    Returns
    -------
    list of OverviewSection
        Empty when no matrix has been analysed.
    """
    table = overview_tables.overview_table(models, metric, k, eps)
    if table.empty:
        return []
    zmax = MEASURES[metric].shown(float(table["value"].max()))  # the colour axis is in the shown unit
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
        title = overview_tables.section_title(section)
        part = table[table["section"] == title]
        experts = section[1] is not None
        rows = sorted(part["row"].unique(), key=layer_sort)
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
            note = "" if tables.names_method(label, method) else f"<br><sup>{chart_text(method)}</sup>"
            panel_title = f"{chart_text(_short(label))}{note}"
            panels.append(
                _overview_panel(cells, rows, columns, experts=experts, metric=metric, zmax=zmax, title=panel_title)
            )
            indices.append(index)
        width = 3 if len(columns) <= OVERVIEW_TEXT_MAX_COLUMNS else (2 if len(columns) <= 40 else 1)
        sections.append(OverviewSection(title, panels, indices, panel_columns(len(panels), width)))
    return sections


def panel_columns(n_panels: int, most: int) -> int:
    """How many of ``n_panels`` panels sit side by side, at most ``most``: rows as even as can be.

    Four fine-tunes are two rows of two (not three and one alone, each a third of the
    width); five are three and two.

    Parameters
    ----------
    n_panels : int
        How many panels the grid has.
    most : int
        The most panels a row can hold.

    Returns
    -------
    int
        At least 1.
    """
    rows = math.ceil(max(n_panels, 1) / max(most, 1))
    return max(1, math.ceil(max(n_panels, 1) / rows))


def overview_title(metric: str, k: int, eps: float) -> str:
    """The overview's heading for ``metric`` (with k and eps for intruder counts).

    Parameters
    ----------
    metric : str
        One of :data:`charts.overview_tables.OVERVIEW_METRICS`.
    k : int
        How many top tuned singular vectors are searched for intruders.
    eps : float
        The threshold on the best match below which a tuned vector is an intruder.

    Returns
    -------
    str
    """
    counted = metric in ("intruders", "intruder_energy_share")  # both depend on k and eps
    return overview_tables.OVERVIEW_METRICS[metric] + (f" (top {k}, ε = {eps:g})" if counted else "")


def totals_figure(models: Sequence[ModelResult], k: int, eps: float) -> go.Figure:
    """Per-model total intruder dimensions at (k, eps), coloured by fine-tune.

    Parameters
    ----------
    models : sequence of ModelResult
        The fine-tunes, in the order they are drawn.
    k : int
        How many top tuned singular vectors are searched for intruders.
    eps : float
        The threshold on the best match below which a tuned vector is an intruder.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    table = tables.totals_table(models, k, eps)
    # Short first line (a phone cut the long one), the settings below it.
    title = f"Intruder dimensions per fine-tune<br><sup>top {k}, ε = {eps:g}, summed over every matrix</sup>"
    if table.empty:
        return empty_figure(title, "No fine-tunes analysed yet")
    fig = go.Figure()
    for index, (model, row) in enumerate(zip(models, table.itertuples(), strict=True)):
        style = model_style(index, model)
        fig.add_trace(
            go.Bar(
                x=[chart_text(row.model)],
                y=[row.intruders],
                name=legend_name(row.model, model),
                text=[row.intruders],
                textposition="outside",
                marker_color=style["color"],
                marker_pattern_shape=style["pattern"],
                hovertemplate=f"{chart_text(row.model)}<br>{chart_text(row.method)}<br>{row.intruders} intruders over "
                f"{row.matrices} matrices<extra></extra>",
            )
        )
    top = float(table["intruders"].max())
    # Counts are never negative: the axis starts at 0 (a lone zero bar once got -1..1 with
    # its "0" floating mid-plot), whole-number ticks, room above the tallest bar's label.
    fig.update_layout(
        title=title,
        yaxis={"title": "intruder dimensions", "range": [0, 1.15 * max(top, 1)], **count_ticks(max(top, 1), most=6)},
        showlegend=True,
        legend={"orientation": "h", "y": -0.2},  # below: beside the bars it took 40 % of a phone's width
        height=360,
    )
    return fig
