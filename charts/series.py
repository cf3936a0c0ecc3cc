"""The Series page's charts: a fine-tune's checkpoints against training step.

Metric trends by step, and the overview's grids and one matrix's similarity heatmap at
one step (the page's one step control picks it). Pure functions (no Streamlit, no I/O),
drawn from the tables of :mod:`charts.series_tables`, which are also what the page offers as CSV.

References: intruder dimensions, Shuttleworth et al. 2024 (arXiv:2410.21228, Def. 3.1,
sec. 5); the update's rank over training, Biderman et al. 2024 (arXiv:2405.09673, Fig. 6).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.results import MatrixResult, ModelResult
from charts import series_tables, tables
from charts.colors import GRID_BAR_PX, cell_text, colorscale, count_ticks, grid_bar_below, grid_colorbar
from charts.overview import OVERVIEW_TEXT_MAX_COLUMNS, cell_label
from charts.style import (
    DASHES,
    PALETTE,
    SYMBOLS,
    chart_text,
    empty_figure,
    layer_sort,
    metric_colorscale,
    rank_heatmap,
    reduce_heatmap,
)
from charts.table_words import MEASURES


def _opening(steps: list[int], step: int | None) -> int:
    """Index of the step a series chart shows.

    ``step``'s, or the last step's when ``step`` is ``None`` or not among ``steps``.
    """
    return steps.index(step) if step in steps else len(steps) - 1


def series_title(label: str, what: str) -> str:
    """The series' name over a smaller line saying what is drawn (fits a phone's width)."""
    return f"{chart_text(label)}<br><sup>{what}</sup>" if label else what


def group_looks(table) -> dict[str, dict]:
    """A colour, a dash and a marker per group of a series table, no two groups alike.

    Per matrix (``table`` has the columns of :data:`charts.series_tables.MATRIX_IDENTITY`)
    the colour says the module kind (of its stack), the dash and the marker the layer (and
    expert): every ``query`` line is one colour, every layer-0 line solid, so ~36 lines
    of a small model read as 6 colours x 6 dashes instead of 36 lines in 10 colours. Other
    groupings take the colours in turn and a new dash after every :data:`PALETTE` colour.
    Colour and look are distinct for every pair of groups up to ``len(DASHES) x len(SYMBOLS)``
    (64) groups per colour; beyond that the hover still names every line.

    Parameters
    ----------
    table : pandas.DataFrame
        :func:`charts.series_tables.series_table`.

    Returns
    -------
    dict
        ``group`` -> ``{"color", "dash", "symbol"}``.
    """
    groups = table.drop_duplicates("group")
    if set(series_tables.MATRIX_IDENTITY) <= set(table.columns):
        kinds = [f"{stack} {module}" for stack, module in zip(groups["stack"], groups["module"], strict=True)]
        places = [f"{layer} {expert}" for layer, expert in zip(groups["layer"], groups["expert"], strict=True)]
    else:
        kinds = [str(g % len(PALETTE)) for g in range(len(groups))]
        places = [str(g // len(PALETTE)) for g in range(len(groups))]
    kind_index = {kind: i for i, kind in enumerate(dict.fromkeys(kinds))}
    place_index = {place: i for i, place in enumerate(dict.fromkeys(places))}
    order = sorted(
        zip(groups["group"], kinds, places, strict=True), key=lambda g: (kind_index[g[1]], place_index[g[2]])
    )
    looks = {}
    for group, kind, place in order:  # one kind's lines together, so the legend reads kind by kind
        turn, colour = divmod(kind_index[kind], len(PALETTE))
        look = place_index[place] + len(place_index) * turn  # kinds past the palette's end: new looks
        looks[group] = {
            "color": PALETTE[colour],
            # Dash and marker both change from one layer to the next (a legend's short sample
            # hardly shows a long dash); past 8 layers the marker shifts, so the pair stays new.
            "dash": DASHES[look % len(DASHES)],
            "symbol": SYMBOLS[(look + look // len(DASHES)) % len(SYMBOLS)],
        }
    return looks


def series_trend_figure(table, by: str = "model", label: str = "") -> go.Figure:
    """Intruders, effective rank, rank90 and ``||dW||_F`` of a series against training step.

    ``table`` is :func:`charts.series_tables.series_table`; one line per group (the whole
    model, a layer, a module kind or a matrix), the same colour in all four panels.
    Intruders appear and grow with training (Shuttleworth et al. 2024, sec. 5); the
    update's rank grows with data (Biderman et al. 2024, Fig. 6).

    Parameters
    ----------
    table : pandas.DataFrame
        The series table.
    by : str
        How ``table`` is grouped (named in the title).
    label : str
        The series' name, over the title.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    if table.empty:
        return empty_figure("Checkpoint series", "No checkpoint has results yet.")
    names = list(series_tables.SERIES_METRICS)
    fig = make_subplots(
        rows=2,
        cols=2,
        shared_xaxes=True,
        vertical_spacing=0.12,
        subplot_titles=list(series_tables.SERIES_METRICS.values()),
    )
    looks = group_looks(table)
    words = {metric: chart_text(name) for metric, name in series_tables.SERIES_METRICS.items()}
    for group, look in looks.items():
        rows = table[table["group"] == group].sort_values("step")
        for i, metric in enumerate(names):
            fig.add_trace(
                go.Scatter(
                    x=rows["step"],
                    y=rows[metric],
                    mode="lines+markers",
                    name=chart_text(group),
                    legendgroup=group,
                    showlegend=i == 0,
                    line={"color": look["color"], "dash": look["dash"]},
                    marker={"color": look["color"], "symbol": look["symbol"]},
                    hovertemplate=f"{chart_text(group)}<br>step %{{x}}<br>{words[metric]} = "
                    f"%{{y:{MEASURES[metric].digits}}}<extra></extra>",
                ),
                row=i // 2 + 1,
                col=i % 2 + 1,
            )
    fig.update_xaxes(title_text="training step", row=2)
    # Counts, ranks and norms are never negative: every panel starts at 0, so a rise from
    # 220 to 224 is not drawn as a tenfold one.
    fig.update_yaxes(rangemode="tozero")
    if "intruders" in names:  # whole counts: no 0.5 ticks
        i = names.index("intruders")
        fig.update_yaxes(**count_ticks(float(table["intruders"].max())), row=i // 2 + 1, col=i % 2 + 1)
    grouping = series_tables.GROUPING_WORDS.get(by, by)
    fig.update_layout(
        title=series_title(label, f"the update against training step ({grouping})"),
        height=620,
        # Hung from the figure's bottom edge, not 15 % of the plot below it: a long legend (36
        # matrices) shrinks the plot, and on a phone it then sat on the "training step" titles.
        legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom"},
        margin={"t": 90},
    )
    return fig


def _grid_shapes(table) -> dict[str, tuple[list[str], list[str]]]:
    """The rows (layers) and columns (modules or experts) of each grid of a series grid table.

    In the order the grids are met; raises ``ValueError`` when two matrices share a cell.
    """
    shapes = {}
    for section in dict.fromkeys(table["section"]):
        part = table[table["section"] == section]
        rows = sorted(part["row"].unique(), key=layer_sort)
        experts = part["expert"].notna().all()
        columns = sorted(part["column"].unique(), key=int) if experts else tables.module_order(part["column"])
        shapes[section] = (rows, columns)
    twice = table.duplicated(["step", "section", "row", "column"])
    if twice.any():
        first = table[twice].iloc[0]
        raise ValueError(f"two matrices in one series grid cell: {first['label']} ({first['matrix']})")
    return shapes


def _grid_heatmaps(
    table, shapes: dict[str, tuple[list[str], list[str]]], metric: str, step: int, zrange: tuple[float, float]
) -> list[list[go.Heatmap | go.Scatter]]:
    """Per grid of ``shapes``: a heatmap of ``metric`` at ``step``, and its values written in the cells.

    The values are written where cells can hold them, as the overview writes them
    (:func:`charts.overview.cell_label`), in the measure's one unit
    (:data:`charts.table_words.MEASURES`); ``zrange`` is the colour axis' ends, for the
    colour of each cell's text.
    """
    now = table[table["step"] == step]
    measure = MEASURES[metric]
    out = []
    for n, (section, (rows, columns)) in enumerate(shapes.items()):
        cells = now[now["section"] == section]
        z = np.full((len(rows), len(columns)), np.nan)
        text = np.full(z.shape, "", dtype=object)
        ii = [rows.index(r) for r in cells["row"]]
        jj = [columns.index(c) for c in cells["column"]]
        values = measure.shown(cells[metric].to_numpy(dtype=float))
        z[ii, jj] = values
        text[ii, jj] = [chart_text(label) for label in cells["label"]]
        traces: list[go.Heatmap | go.Scatter] = [
            go.Heatmap(
                z=z,
                x=[chart_text(c) for c in columns],
                y=[chart_text(r) for r in rows],
                customdata=text,
                coloraxis="coloraxis",
                xgap=1,
                ygap=1,
                xaxis=f"x{n + 1 if n else ''}",
                yaxis=f"y{n + 1 if n else ''}",
                hovertemplate=f"%{{customdata}}<br>{chart_text(series_tables.SERIES_METRICS[metric])} = "
                f"%{{z:{measure.digits}}}{measure.suffix}<extra>step {step}</extra>",
            )
        ]
        # Cells are 28 px high; a grid of more columns than the overview writes in (many
        # experts) has cells too narrow for a number: its hover says it.
        if len(columns) <= OVERVIEW_TEXT_MAX_COLUMNS and len(cells):
            traces.append(
                cell_text(
                    [chart_text(columns[j]) for j in jj],
                    [chart_text(rows[i]) for i in ii],
                    [cell_label(v, metric) for v in values],
                    values,
                    metric_colorscale(metric),
                    *zrange,
                    size=10,
                )
            )
        out.append(traces)
    return out


def _grid_subplots(shapes: dict[str, tuple[list[str], list[str]]]) -> tuple[go.Figure, int]:
    """The grids stacked top to bottom, each as high as its layers need; also the plot's height.

    Pixels: each grid 28 per layer (at least 60), 70 between grids for ticks and a title.
    """
    sections = list(shapes)
    panels = [max(60, 28 * len(shapes[s][0])) for s in sections]
    gap = 70
    plot_px = sum(panels) + gap * (len(sections) - 1)
    fig = make_subplots(
        rows=len(sections),
        cols=1,
        subplot_titles=[chart_text(s) for s in sections] if len(sections) > 1 else None,
        row_heights=panels,
        vertical_spacing=gap / plot_px if len(sections) > 1 else 0.0,
    )
    return fig, plot_px


def series_grid_figure(table, metric: str, label: str = "", step: int | None = None) -> go.Figure:
    """The overview's grids of ``metric`` at one training step.

    ``table`` is :func:`charts.series_tables.series_grid_table`: one layer x module grid per
    stack and one layer x expert grid per mixture-of-experts module (the overview's
    convention, :func:`charts.overview.overview_sections`), stacked top to bottom; every
    matrix is one cell of its grid and no cell holds two. The colour scale is shared by
    every grid and step, so colours compare from step to step; it shows ``step`` (the
    last step when ``None`` or not among the table's). Hover names the matrix.

    Parameters
    ----------
    table : pandas.DataFrame
        The series grid table.
    metric : str
        The metric drawn (its column in ``table``, one of
        :data:`charts.series_tables.SERIES_METRICS`).
    label : str
        The series' name, over the title.
    step : int or None
        The step shown.

    Returns
    -------
    plotly.graph_objects.Figure
        One heatmap per grid (a message
        when ``table`` is empty).
    """
    if table.empty:
        return empty_figure("Checkpoint series", "No checkpoint has results yet.")
    steps = sorted(table["step"].unique().tolist())
    shapes = _grid_shapes(table)
    sections = list(shapes)
    values = MEASURES[metric].shown(table[metric].astype(float))
    zmin, zmax = (
        (0.0, max(1.0, float(values.max()))) if metric == "intruders" else (float(values.min()), float(values.max()))
    )
    title = series_tables.SERIES_METRICS[metric]
    shown = steps[_opening(steps, step)]
    fig, plot_px = _grid_subplots(shapes)
    for n, traces in enumerate(_grid_heatmaps(table, shapes, metric, shown, (zmin, zmax))):
        for trace in traces:
            fig.add_trace(trace, row=n + 1, col=1)
    fig.update_yaxes(title_text="layer", autorange="reversed", type="category")
    # Slanted module names (a phone) may reach past the grid's right edge: the margin grows for them.
    fig.update_xaxes(type="category", automargin="height+right")
    for n, section in enumerate(sections):
        if section.endswith("layer × expert"):
            fig.update_xaxes(title_text="expert", title_standoff=4, row=n + 1, col=1)
    fig.update_annotations(font_size=12)
    ticks = count_ticks(zmax) if metric == "intruders" else {}
    below = grid_bar_below(max((len(str(c)) for _, columns in shapes.values() for c in columns), default=1))
    fig.update_layout(
        title=series_title(label, f"{title} per layer and module at step {shown}"),
        coloraxis={"colorscale": metric_colorscale(metric), "cmin": zmin, "cmax": zmax,
                   "colorbar": grid_colorbar(MEASURES[metric].title(), plot_px, below, **ticks)},
        margin={"t": 100, "b": below + GRID_BAR_PX, "r": 20},
        height=100 + plot_px + below + GRID_BAR_PX,
    )  # fmt: skip
    return fig


def series_similarity_figure(
    models: Sequence[ModelResult], matrix: str, label: str = "", step: int | None = None
) -> go.Figure:
    """``|Ut^T U0|`` of one matrix (its :attr:`~analysis.identity.MatrixId.key`) at each checkpoint of a series.

    At ``step`` (the last when ``None`` or absent); the page's step control moves it.

    The similarity block of :func:`charts.spectra.similarity_figure` (Shuttleworth et al. 2024, Fig. 1/3;
    rows tuned rank, columns base rank), reduced to :data:`charts.style.MAX_HEATMAP_SIDE`; stepping
    shows how the tuned singular vectors drift away from the base ones as training goes on.

    Parameters
    ----------
    models : sequence of ModelResult
        The checkpoints of one series, each with its ``step``.
    matrix : str
        The matrix's key.
    label : str
        The series' name, over the title.
    step : int or None
        The step shown.

    Returns
    -------
    plotly.graph_objects.Figure
        The matrix at that step (a message when no checkpoint has the matrix).
    """
    found = [(model.step, m) for model in series_tables.by_step(models) for m in model.matrices if m.key == matrix]
    if not found:
        return empty_figure("Similarity across steps", f"No checkpoint has results for {matrix} yet.")
    steps = [step for step, _ in found]

    def heatmap(step: int, matrix: MatrixResult) -> go.Heatmap:
        z, block = reduce_heatmap(np.asarray(matrix.similarity, dtype=np.float64))
        return rank_heatmap(
            z,
            block,
            colorscale=colorscale("similarity"),
            colorbar={"title": "|cos|"},
            hovertemplate=f"step {step}<br>tuned rank %{{y}}<br>base rank %{{x}}<br>"
            f"|cos| = %{{z:{MEASURES['cosine'].digits}}}<extra></extra>",
        )

    shown, first = found[_opening(steps, step)]
    fig = go.Figure(data=[heatmap(shown, first)])
    n = first.similarity.shape[0]
    fig.update_yaxes(title_text="tuned singular vector (rank)", range=[n + 0.5, 0.5])
    fig.update_xaxes(title_text="base singular vector (rank)", range=[0.5, first.similarity.shape[1] + 0.5])
    fig.update_layout(
        title=series_title(label, f"{chart_text(first.short_label)}: |Uₜᵀ U₀| at step {shown}"),
        margin={"t": 90},
        height=520,
    )
    return fig
