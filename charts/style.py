"""The shared look of the dashboard's charts: colours, line styles, axes and heatmaps.

Every figure module of :mod:`charts` draws with these, so a fine-tune keeps its colour,
dash and marker from chart to chart, every log axis has the same plain tick labels, and
every large heatmap is reduced on the server the same way (:func:`reduce_heatmap`) before
anything reaches a browser. Pure functions (no Streamlit, no I/O).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from analysis.results import ModelResult
from charts import tables
from charts.colors import colorscale, whole_step

#: Largest heatmap side sent to a browser; bigger ones are reduced by block maximum.
MAX_HEATMAP_SIDE = 128
#: Largest number of points per spectrum line; longer spectra are sampled log-evenly.
MAX_SPECTRUM_POINTS = 1500

PALETTE = qualitative.D3
INTRUDER_COLOR = "#d62728"

#: Dash patterns and marker symbols cycled per fine-tune, so curves that coincide (all at
#: zero, say) still show each other: later ones are drawn thinner and smaller on top.
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot", "5px,2px,1px,2px", "1px,3px")
SYMBOLS = ("circle", "diamond", "square", "triangle-up", "x", "cross", "star", "triangle-down")


def chart_config(filename: str) -> dict:
    """Plotly config for ``st.plotly_chart``: a toolbar PNG download named ``filename``.

    Parameters
    ----------
    filename : str
        Name of the downloaded PNG, without extension.

    Returns
    -------
    dict
        The ``config`` argument of ``st.plotly_chart``.
    """
    return {
        "displaylogo": False,
        "toImageButtonOptions": {"format": "png", "filename": filename, "scale": 2},
    }


def empty_figure(title: str, message: str) -> go.Figure:
    """A blank figure that says why there is nothing to draw.

    Parameters
    ----------
    title : str
        The figure's title (what would have been drawn).
    message : str
        The words shown in the middle of the figure.

    Returns
    -------
    plotly.graph_objects.Figure
        A 300 px high figure with no axes and ``message`` as its only annotation.
    """
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False, height=300)
    return fig


# -- one look per fine-tune ----------------------------------------------------------------------
def model_style(index: int, model: ModelResult) -> dict:
    """Colour and marks per fine-tune.

    LoRA dashed with diamonds and hatched bars, full fine-tuning solid circles and plain
    bars.

    Parameters
    ----------
    index : int
        Position of the fine-tune among those drawn (picks the colour from :data:`PALETTE`).
    model : ModelResult
        The fine-tune (LoRA or not, :func:`charts.tables.is_lora`).

    Returns
    -------
    dict
        ``color``, ``dash``, ``symbol`` and the bars' ``pattern`` shape.
    """
    lora = tables.is_lora(model)
    return {
        "color": PALETTE[index % len(PALETTE)],
        "dash": "dash" if lora else "solid",
        "symbol": "diamond" if lora else "circle",
        "pattern": "/" if lora else "",
    }


def metric_colorscale(metric: str, dark: bool = False) -> list[list]:
    """The colour scale of a grid of ``metric``: reds for intruder counts, Viridis otherwise.

    The colour bar ticks of counts are whole numbers (:func:`count_ticks`).

    Drawn for a light page; :func:`themed` swaps it for its dark twin on a dark page.

    Parameters
    ----------
    metric : str
        The metric drawn (``intruders``, ``effective_rank``, ...).
    dark : bool
        Whether the page is dark.

    Returns
    -------
    list of [float, str]
        A Plotly colour scale (:func:`colorscale`).
    """
    return colorscale("counts" if metric == "intruders" else "measure", dark)


def chart_text(text: object) -> str:
    """``text`` (anything, as ``str``) as Plotly shows it: literally.

    Plotly renders a subset of HTML in every text it draws (titles, legends, hover labels,
    tick labels, annotations: ``<a href>``, ``<b>``, ``<br>``, entities), so a model name
    from a shared link, an upload's name or a model's files could be a link in a chart.
    Its ``&``, ``<`` and ``>`` become entities, which Plotly shows as those characters.
    Every name placed into a figure's text goes through this; the markup the figures add
    themselves (``<br><sup>``) is added around it.

    Parameters
    ----------
    text : object
        A name, a label, an error: anything from outside the server.

    Returns
    -------
    str
        The text with ``&``, ``<`` and ``>`` as ``&amp;``, ``&lt;`` and ``&gt;``.
    """
    return html.escape(str(text), quote=False)


#: About how many characters of a title's small second line fit a phone (390 px).
PHONE_LINE_CHARS = 44


def wrap_name(name: object, most: int = PHONE_LINE_CHARS) -> str:
    """A tensor name as chart text, broken at its dots into lines of at most ``most`` characters.

    A Plotly title does not wrap: a phone's width cut ``...self.query.weight`` off. A
    part longer than ``most`` by itself is cut in the middle of it instead.

    Parameters
    ----------
    name : object
        The name (anything, as ``str``).
    most : int
        The longest line, in characters.

    Returns
    -------
    str
        :func:`chart_text` lines joined by ``<br>``.
    """
    parts = str(name).split(".")
    lines: list[str] = []
    for i, part in enumerate(parts):
        piece = part + ("." if i < len(parts) - 1 else "")
        if lines and len(lines[-1]) + len(piece) <= most:
            lines[-1] += piece
            continue
        while len(piece) > most:
            lines.append(piece[:most])
            piece = piece[most:]
        lines.append(piece)
    return "<br>".join(chart_text(line) for line in lines)


def name_lines(name: str) -> str:
    """A tensor name as the small lines under a title (:func:`charts.style.wrap_name`).

    Parameters
    ----------
    name : str
        The tensor name.

    Returns
    -------
    str
        ``<br><sup>...</sup>`` per line.
    """
    return "".join(f"<br><sup>{line}</sup>" for line in wrap_name(name).split("<br>"))


def title_margin(title: str, below: int = 0) -> int:
    """The top margin, in pixels, that a title of this many lines needs (see :func:`top_title`).

    Parameters
    ----------
    title : str
        The title: a first line, then small (``<sup>``) lines after each ``<br>``.
    below : int
        Pixels wanted between the title and the plot (subplot titles sit there).

    Returns
    -------
    int
    """
    return 12 + 26 + 17 * title.count("<br>") + 10 + below


def top_title(title: str) -> dict:
    """A title hung from the figure's top edge, its lines going down into the top margin.

    Plotly puts a title's first baseline in the middle of the top margin by default, so a
    third line reached into the plot (onto a subplot's title); with the margin of
    :func:`title_margin` every line stays above the plot.

    Parameters
    ----------
    title : str
        The title.

    Returns
    -------
    dict
        The layout's ``title``.
    """
    return {"text": title, "y": 1, "yref": "container", "yanchor": "top", "pad": {"t": 12}}


def integer_ticks(n: int, most: int = 10) -> list[int]:
    """Ticks at rank 1 and at multiples of a 1-2-5 step up to ``n`` (ranks are 1-based, whole).

    Parameters
    ----------
    n : int
        The highest rank on the axis.
    most : int
        About how many ticks at most.

    Returns
    -------
    list of int
        ``1, step, 2 * step, ...`` (``1, 3, 5, ...`` for a step of 2; ``1 .. n`` when they fit).
    """
    step = whole_step(n, most)
    if step <= 2:  # 1, 3, 5, ...: not 1 and 2 side by side
        return list(range(1, n + 1, step))
    return [1] + [t for t in range(step, n + 1, step) if t > 1]


def legend_name(label: str, model: ModelResult) -> str:
    """``label (method)``, or the label alone when it names the method already.

    The demo's "LoRA r=1", never "LoRA r=1 (LoRA r=1)".

    Parameters
    ----------
    label : str
        The fine-tune's display label (:func:`charts.tables.model_labels`).
    model : ModelResult
        The fine-tune, whose :func:`charts.tables.training_method` may be added.

    Returns
    -------
    str
        The legend entry, as chart text (:func:`chart_text`).
    """
    method = tables.training_method(model)
    return chart_text(label if tables.names_method(label, method) else f"{label} ({method})")


def series_style(index: int, model: ModelResult) -> dict:
    """A colour, a dash pattern and a marker per fine-tune, all distinct up to 8 series.

    Sizes shrink with ``index`` so that markers drawn at the same point stay visible as
    nested shapes.

    Parameters
    ----------
    index : int
        Position of the fine-tune among those drawn.
    model : ModelResult
        The fine-tune (unused: the look depends on ``index`` only).

    Returns
    -------
    dict
        ``color``, ``dash``, ``symbol``, marker ``size`` and line ``width``.
    """
    return {
        "color": PALETTE[index % len(PALETTE)],
        "dash": DASHES[index % len(DASHES)],
        "symbol": SYMBOLS[index % len(SYMBOLS)],
        "size": max(5, 13 - 1.2 * (index % len(SYMBOLS))),
        "width": max(1.2, 3.0 - 0.3 * (index % len(SYMBOLS))),
    }


def series_mode(n_points: int) -> str:
    """The scatter mode for a series of ``n_points``.

    Markers where a line cannot be seen (a single point), lines and markers for short
    series, plain lines for long ones.

    Parameters
    ----------
    n_points : int
        How many points the series has.

    Returns
    -------
    str
        A Plotly scatter ``mode``.
    """
    if n_points <= 1:
        return "markers"
    return "lines+markers" if n_points <= 40 else "lines"


# -- axes ----------------------------------------------------------------------------------------
def log_ticks(low: float, high: float) -> tuple[list[float], list[str]]:
    """Tick values and labels for a log axis over ``[low, high]`` (both > 0).

    Powers of ten labelled in plain numbers (``0.001``, ``1``, ``100``) when every tick is
    from 0.001 to below 1e5, otherwise all as ``1e-5``, ``1e-3``, ``1e0`` (one notation per
    axis, never ``0.001`` beside ``1e-4``); 2 and 5 times them are added only when the range spans
    less than two decades, so there are never unlabelled minor digits or SI prefixes
    (``100µ``).

    Parameters
    ----------
    low, high : float
        The range to label; anything not finite and positive gives a single tick at 1.

    Returns
    -------
    tuple of (list of float, list of str)
        Tick values and their labels.
    """
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 or high <= 0:
        return [1.0], ["1"]
    low, high = min(low, high), max(low, high)
    e0, e1 = math.floor(math.log10(low)), math.ceil(math.log10(high))
    mults = (1, 2, 5) if e1 - e0 <= 2 else (1,)
    step = max(1, math.ceil((e1 - e0 + 1) / 8))
    values = [m * 10.0**e for e in range(e0, e1 + 1, 1 if len(mults) > 1 else step) for m in mults]
    values = [v for v in values if low / 1.0001 <= v <= high * 1.0001]
    if len(values) < 2:  # a narrow range (1.05 to 1.2) holds no 1-2-5 value: even steps inside it
        return _narrow_ticks(low, high)

    plain = all(1e-3 <= v < 1e5 for v in values)

    def fmt(v: float) -> str:
        if plain:
            return f"{v:.10g}"
        mantissa, exponent = f"{v:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"

    return values, [fmt(v) for v in values]


def _narrow_ticks(low: float, high: float) -> tuple[list[float], list[str]]:
    """Evenly stepped ticks (1-2-5 steps) inside ``[low, high]``, too narrow for powers of ten.

    Two to five ticks; one at ``low`` when ``low == high``.
    """
    span = high - low
    if span <= 0:
        return [low], [f"{low:.3g}"]
    step = next(
        m * 10.0**e
        for e in range(math.floor(math.log10(span)) - 2, 400)
        for m in (1, 2, 5)
        if span / (m * 10.0**e) <= 4
    )
    first = math.ceil(low / step - 1e-9)
    values = [round(k * step, 12) for k in range(first, math.floor(high / step + 1e-9) + 1)]
    decimals = max(0, -math.floor(math.log10(step)))
    return values, [f"{v:.{decimals}f}" if 1e-3 <= v < 1e5 else f"{v:.2e}" for v in values]


def log_axis(values, **extra) -> dict:
    """A log axis spanning the positive ``values`` with :func:`log_ticks`.

    Parameters
    ----------
    values : array-like
        The values drawn on the axis; non-finite and non-positive ones are ignored.
    **extra
        Further axis properties (``title``, ...), added as they are.

    Returns
    -------
    dict
        Plotly axis properties (a bare log axis when no value is positive).
    """
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


_LOG_TICKS = [m * 10**e for e in range(7) for m in (1, 2, 5)]


def rank_axis(n_max: int) -> dict:
    """A log x axis of singular-value ranks 1..``n_max`` with plain 1-2-5 tick labels.

    Parameters
    ----------
    n_max : int
        The highest rank drawn.

    Returns
    -------
    dict
        Plotly axis properties, titled ``rank``.
    """
    ticks = [t for t in _LOG_TICKS if t <= n_max]
    return {
        "title": "rank",
        "type": "log",
        "tickvals": ticks,
        "ticktext": [str(t) for t in ticks],
        "range": [-0.05, math.log10(n_max * 1.1)],
    }


def log_sample(n: int, keep: Sequence[int], max_points: int = MAX_SPECTRUM_POINTS) -> np.ndarray:
    """Indices ``0..n-1`` thinned log-evenly to about ``max_points``, ``keep`` always in.

    Parameters
    ----------
    n : int
        Length of the series.
    keep : sequence of int
        Indices that are always kept (intruders on a spectrum); used only when thinning.
    max_points : int
        About how many indices to keep.

    Returns
    -------
    numpy.ndarray
        Sorted indices (all of ``0..n-1`` when ``n <= max_points``).
    """
    if n <= max_points:
        return np.arange(n)
    idx = np.unique(np.round(np.geomspace(1, n, max_points)).astype(np.int64) - 1)
    return np.union1d(idx, np.asarray(list(keep), dtype=np.int64))


def thinned(n: int, most: int) -> list[int]:
    """Every ``step``-th of the indices ``0..n-1``, at most ``most`` of them (axis ticks).

    Parameters
    ----------
    n : int
        How many positions the axis has.
    most : int
        The most ticks wanted.

    Returns
    -------
    list of int
        ``0, step, 2 * step, ...`` below ``n``.
    """
    step = max(1, math.ceil(n / most))
    return list(range(0, n, step))


def layer_sort(label: str) -> tuple[bool, int]:
    """Sort key of a layer label (:func:`charts.tables.layer_label`): blocks by index, ``other`` last.

    Parameters
    ----------
    label : str
        A block index as text, or ``other``.

    Returns
    -------
    tuple of (bool, int)
        The key.
    """
    return (label == "other", int(label) if label.isdigit() else 0)


# -- heatmaps ------------------------------------------------------------------------------------
def reduce_heatmap(z: np.ndarray, max_side: int = MAX_HEATMAP_SIDE) -> tuple[np.ndarray, int]:
    """Shrink a heatmap to at most ``max_side`` cells a side by taking block maxima.

    Block maxima keep every strong entry visible (an intruder's missing match or a
    single strong alignment never averages away). Returns the reduced array and the
    block size (1 when nothing was reduced); NaN-only blocks stay NaN.

    Parameters
    ----------
    z : numpy.ndarray
        The 2-D heatmap.
    max_side : int
        Most cells a side after reduction.

    Returns
    -------
    tuple of (numpy.ndarray, int)
        The reduced heatmap (float64) and the block size.
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


def rank_heatmap(z: np.ndarray, block: int, **style) -> go.Heatmap:
    """A [0, 1] heatmap over 1-based ranks whose cells are ``block`` ranks wide.

    ``z`` and ``block`` come from :func:`reduce_heatmap`; each cell is centred on the
    middle of the ranks it summarises.

    Parameters
    ----------
    z : numpy.ndarray
        The (reduced) heatmap.
    block : int
        How many ranks each cell covers.
    **style
        Further heatmap properties (colour scale, colour bar, hover template).

    Returns
    -------
    plotly.graph_objects.Heatmap
        The trace, with ``zmin=0`` and ``zmax=1``.
    """
    center = (block + 1) / 2
    return go.Heatmap(z=z, x0=center, dx=block, y0=center, dy=block, zmin=0, zmax=1, **style)
