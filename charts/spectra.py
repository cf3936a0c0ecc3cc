"""Charts of one matrix: its similarity heatmap, its spectra, and the subspace similarity of two updates of it.

Pure functions (no Streamlit, no I/O), drawn from :func:`charts.matrix_tables.intruder_table`,
:func:`charts.matrix_tables.spectrum_table` and :func:`charts.matrix_tables.subspace_similarity`, which
are also what the pages offer as CSV. Large heatmaps are reduced here, on the server, before
anything reaches a browser (:func:`charts.style.reduce_heatmap`).

References: intruder dimensions and the similarity matrix, Shuttleworth et al. 2024
(arXiv:2410.21228, Def. 3.1, Fig. 1/3); subspace similarity, Hu et al. 2021
(arXiv:2106.09685, sec. 7).
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.results import MatrixResult
from charts import matrix_tables
from charts.colors import colorscale
from charts.style import (
    INTRUDER_COLOR,
    chart_text,
    empty_figure,
    integer_ticks,
    log_axis,
    log_sample,
    name_lines,
    rank_axis,
    rank_heatmap,
    reduce_heatmap,
    series_mode,
    title_margin,
    top_title,
)
from charts.table_words import MEASURES

#: A |cosine|'s digits in a hover, as its tables give it.
COS = MEASURES["cosine"].digits


def _intruder_title(matrix: MatrixResult, label: str, n_intr: int, top: int, eps: float) -> str:
    """The title of a one-matrix chart: ``label: short label`` over the intruder count and the tensor name.

    Parameters
    ----------
    matrix : MatrixResult
        The matrix drawn.
    label : str
        The fine-tune's label (left out when empty).
    n_intr : int
        How many intruder dimensions there are among the top ``top`` tuned vectors.
    top : int
        How many tuned vectors were searched for intruders.
    eps : float
        The threshold on the best match.

    Returns
    -------
    str
        Two lines: a short first one (narrow screens), the details below it.
    """
    # The count on a line of its own, the (long) tensor name below it, broken at its dots:
    # a title does not wrap and a phone's width cut it.
    return (
        f"{chart_text(label) + ': ' if label else ''}{chart_text(matrix.short_label)}<br><sup>{n_intr} intruder"
        f"{'s' if n_intr != 1 else ''} in the top {top} at ε = {eps:g}</sup>{name_lines(matrix.name)}"
    )


def _similarity_heatmap(z: np.ndarray, block: int) -> go.Heatmap:
    """The reduced ``|Ut^T U0|`` block, its colour bar lying under the panels."""
    return rank_heatmap(
        z,
        block,
        colorscale=colorscale("similarity"),
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
        hovertemplate=f"tuned rank %{{y}}<br>base rank %{{x}}<br>|cos| = %{{z:{COS}}}<extra></extra>",
    )


def _intruder_marks(rows_intr) -> go.Scatter:
    """A red triangle at the left edge of the heatmap on each intruder's row."""
    return go.Scatter(
        x=np.full(len(rows_intr), 0.5),
        cliponaxis=False,
        y=rows_intr["tuned_rank"],
        mode="markers",
        marker={"symbol": "triangle-right", "size": 12, "color": INTRUDER_COLOR},
        name="intruder",
        hovertemplate="tuned rank %{y}: intruder<extra></extra>",
    )


def _best_match_bars(intr, is_intruder: np.ndarray) -> go.Bar:
    """Each tuned vector's best match with the base, a horizontal bar per tuned rank (intruders red)."""
    return go.Bar(
        x=intr["best_match_score"],
        y=intr["tuned_rank"],
        orientation="h",
        name="best match",
        marker_color=np.where(is_intruder, INTRUDER_COLOR, "#4c78a8").tolist(),
        customdata=intr["best_match_base_rank"],
        showlegend=False,
        hovertemplate=f"tuned rank %{{y}}<br>best match %{{x:{COS}}} (base rank %{{customdata}})<extra></extra>",
    )


def similarity_figure(matrix: MatrixResult, k: int, eps: float, label: str = "") -> go.Figure:
    """``|Ut^T U0|`` heatmap for one matrix, with each tuned vector's best match beside it.

    Left: the top-N by top-N similarity block (Shuttleworth et al. Fig. 1/3; rows tuned
    rank, columns base rank), reduced to :data:`charts.style.MAX_HEATMAP_SIDE` by block
    maxima. Right: ``score_j = max_i |<Ut[:, j], U0[:, i]>|`` over **all** base vectors for
    the top ``k`` tuned vectors, with the ``eps`` line; intruders (``score_j < eps``) are
    red in both panels. The heatmap follows ``k``: its top ``max(k, 10)`` ranks, up to the
    ``N`` the engine keeps (``AnalysisSettings.similarity_size``).

    Parameters
    ----------
    matrix : MatrixResult
        The matrix drawn.
    k : int
        How many top tuned singular vectors are searched for intruders.
    eps : float
        The threshold on the best match below which a tuned vector is an intruder.
    label : str
        The fine-tune's label, put before the matrix in the title.

    Returns
    -------
    plotly.graph_objects.Figure
        The two panels side by side, sharing the tuned-rank axis.
    """
    full = np.asarray(matrix.similarity, dtype=np.float64)
    n = min(max(k, 10), full.shape[0])
    sim = full[:n, : min(n, full.shape[1])]
    z, block = reduce_heatmap(sim)
    intr = matrix_tables.intruder_table(matrix, k, eps)
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
            "best |cos|",  # short: a longer one overlapped the heatmap's title on a phone
        ],
    )
    fig.add_trace(_similarity_heatmap(z, block), row=1, col=1)
    is_intruder = intr["intruder"].to_numpy()
    rows_intr = intr[is_intruder]
    if len(rows_intr):
        fig.add_trace(_intruder_marks(rows_intr), row=1, col=1)
    fig.add_trace(_best_match_bars(intr, is_intruder), row=1, col=2)
    fig.add_vline(x=eps, line_dash="dash", line_color=INTRUDER_COLOR, row=1, col=2)
    # Ranks are 1-based: both axes start at rank 1 (the cell from 0.5 to 1.5), ticks whole ranks.
    fig.update_yaxes(
        range=[n_rows + 0.5, 0.5],
        tickvals=integer_ticks(n_rows),
        title_text="tuned singular vector (rank)",
        row=1,
        col=1,
    )
    fig.update_xaxes(
        range=[0.5, sim.shape[1] + 0.5],
        tickvals=integer_ticks(sim.shape[1], 6),
        title_text="base singular vector (rank)",
        row=1,
        col=1,
    )
    # The bars fill the panel: the dashed ε line is named in the axis title, not over a bar.
    fig.update_xaxes(range=[0, 1.05], title_text=f"max |cos|<br>(ε = {eps:g})", row=1, col=2)
    title = _intruder_title(matrix, label, int(is_intruder.sum()), len(intr), eps)
    fig.update_layout(
        title=top_title(title),
        height=max(460, min(940, 12 * n_rows + 200)) + max(0, title_margin(title, 26) - 100),
        showlegend=False,
        margin={"b": 120, "t": title_margin(title, 26)},
    )
    return fig


def spectrum_figure(matrix: MatrixResult, k: int, eps: float, label: str = "") -> go.Figure:
    """Singular values of base, tuned and update for one matrix on log scales.

    The base is a thick dashed grey line drawn over the tuned one (solid blue), so where
    fine-tuning left the spectrum alone both still show; a series with one point (the
    update of a rank-1 LoRA) is a marker. Intruder dimensions among the top ``k`` tuned
    vectors (Shuttleworth et al. Def. 3.1) are marked on the tuned spectrum at the rank
    where they sit.

    Parameters
    ----------
    matrix : MatrixResult
        One analysed matrix.
    k : int
        How many top tuned singular vectors are searched for intruders.
    eps : float
        The threshold on the best match below which a tuned vector is an intruder.
    label : str
        The fine-tune's label, put before the matrix in the title (left out when empty).

    Returns
    -------
    plotly.graph_objects.Figure
    """
    spectrum = matrix_tables.spectrum_table(matrix)
    intr = matrix_tables.intruder_table(matrix, k, eps)
    intruders = intr[intr["intruder"]]
    intruder_ranks = intruders["tuned_rank"].to_numpy()
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
        idx = log_sample(n, intruder_ranks - 1 if column == "tuned" else [])
        values = values[idx]
        positive = values > 0
        shown.extend(values[positive].tolist())
        fig.add_trace(
            go.Scatter(
                x=idx[positive] + 1,
                y=values[positive],
                mode=series_mode(int(positive.sum())),
                name=name,
                line={"color": color, "dash": dash, "width": width},
                marker={"color": color, "symbol": symbol, "size": 10 if positive.sum() <= 1 else 6},
                opacity=0.9,
                hovertemplate=f"{name}<br>rank %{{x}}: σ = %{{y:.4g}}<extra></extra>",
            )
        )
    if len(intruder_ranks):
        texts, positions = intruder_labels(intruder_ranks)
        fig.add_trace(
            go.Scatter(
                x=intruders["tuned_rank"],
                y=intruders["singular_value"],
                mode="markers+text",
                name=f"intruder (ε = {eps:g})",
                marker={"symbol": "x", "size": 13, "color": INTRUDER_COLOR, "line": {"width": 2}},
                text=texts,
                textposition=positions,
                customdata=np.stack([intruders["best_match_score"], intruders["best_match_base_rank"]], axis=1),
                hovertemplate=f"intruder at tuned rank %{{x}}<br>σ = %{{y:.4g}}<br>best match %{{customdata[0]:{COS}}} "
                "(base rank %{customdata[1]})<extra></extra>",
            )
        )
    n_max = max(len(spectrum), 1)
    title = _intruder_title(matrix, label, len(intruder_ranks), len(intr), eps)
    yaxis = log_axis(shown, title="singular value")
    if len(intruder_ranks) and "range" in yaxis:  # the "#2" over the top intruder stays inside the plot
        yaxis["range"] = _room_above(yaxis["range"], float(intruders["singular_value"].max()))
    fig.update_layout(
        title=top_title(title),
        xaxis=rank_axis(n_max),
        yaxis=yaxis,
        height=460 + max(0, title_margin(title) - 100),
        margin={"t": title_margin(title)},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


#: Intruder labels closer than this on the log rank axis (decades: ~15 px at a phone's width,
#: where ranks 3-8 fall within 60 px) do not share a row of labels.
_LABEL_GAP_DECADES = 0.15


def intruder_labels(ranks: np.ndarray) -> tuple[list[str], list[str]]:
    """Each intruder's label and where it goes.

    ``"#rank"`` above its cross where the row above has room, else below it, else none (its
    hover still names it); a row needs :data:`_LABEL_GAP_DECADES` between its labels.
    """
    texts, positions, last = [], [], {"top right": -np.inf, "bottom right": -np.inf}
    for rank in ranks:
        at = float(np.log10(rank))
        row = next((r for r, previous in last.items() if at - previous >= _LABEL_GAP_DECADES), None)
        texts.append("" if row is None else f"#{rank}")
        positions.append(row or "top right")
        if row is not None:
            last[row] = at
    return texts, positions


#: The room an intruder's label takes above its cross: half the 13 px marker, Plotly's gap
#: and one 12 px line of text (23 px measured in Chromium), rounded up.
_LABEL_PX = 30
#: The spectrum plot's least height: 281 px at 1400 px wide, 233 px at 390 px (the legend
#: takes rows out of it there), less where a longer legend wraps once more.
_SPECTRUM_PLOT_PX = 200


def _room_above(log_range: list[float], top: float) -> list[float]:
    """``log_range`` (log10 units) with its top raised so :data:`_LABEL_PX` fit over ``top``.

    On a plot :data:`_SPECTRUM_PLOT_PX` high, a share ``p`` of it above ``log10(top)``
    needs the range's top at ``(log10(top) - p * low) / (1 - p)``.
    """
    low, high = log_range
    share = _LABEL_PX / _SPECTRUM_PLOT_PX
    return [low, max(high, (float(np.log10(top)) - share * low) / (1 - share))]


def subspace_figure(phi: np.ndarray, label_a: str, label_b: str, matrix_name: str) -> go.Figure:
    """Heatmap of ``phi(i, j)`` (Hu et al. 2021, eq. 4) between two updates of a matrix.

    ``phi(i, j) = ||P_i^T Q_j||_F^2 / min(i, j)`` over the left singular vectors of each
    update ``dW`` (rows: the first update's top ``i``; columns: the second's top ``j``).

    Parameters
    ----------
    phi : numpy.ndarray
        :func:`charts.matrix_tables.subspace_similarity` of the two updates.
    label_a, label_b : str
        The labels of the first (rows) and the second (columns) fine-tune.
    matrix_name : str
        The tensor name, under the title.

    Returns
    -------
    plotly.graph_objects.Figure
        The heatmap, or a message when either update is zero.
    """
    # Short first line (a phone cuts a long one); the tensor name below it.
    label_a, label_b = chart_text(label_a), chart_text(label_b)
    title = f"Subspace similarity φ(i, j) of ΔW{name_lines(matrix_name)}"
    if phi.size == 0:
        return empty_figure(title, "One of the two updates is zero: no subspace to compare")
    z, block = reduce_heatmap(phi)
    fig = go.Figure(
        rank_heatmap(
            z,
            block,
            colorscale=colorscale("measure"),
            colorbar={"title": "φ"},
            hovertemplate=f"i = %{{y}} ({label_a})<br>j = %{{x}} ({label_b})<br>"
            f"φ = %{{z:{MEASURES['phi'].digits}}}<extra></extra>",
        )
    )
    title += "<br><sup>left singular vectors of ΔW</sup>"
    fig.update_layout(
        title=top_title(title),
        margin={"t": title_margin(title)},
        xaxis={"title": f"j: top-j directions of {label_b}", "tickvals": integer_ticks(phi.shape[1])},
        yaxis={
            "title": f"i: top-i directions of {label_a}",
            "autorange": "reversed",
            "tickvals": integer_ticks(phi.shape[0]),
        },
        height=max(380, min(720, 14 * phi.shape[0] + 160)),
    )
    return fig
