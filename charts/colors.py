"""Colour scales for a light and a dark page, and text that reads on coloured cells.

Every heatmap and grid of :mod:`charts` takes its colour scale from :func:`colorscale`
(drawn for a light page); the dashboard's chart view passes each figure through
:func:`themed`, which swaps every such scale for its dark twin when the visitor's page is
dark and recolours the words written on cells; the one-file HTML report carries the same
swap as a patch (:func:`dark_patch`) that its own script applies when the reader's scheme
is dark. A layer grid's colour bar lies under it, laid out once (:func:`grid_colorbar`).
Pure functions (no Streamlit, no I/O).
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.colors import hex_to_rgb, sequential, unlabel_rgb

#: Colour scales by what they show, one for a light page and one for a dark page. Low
#: values take the page's own tone (a zero cell never glares: near white on a light page,
#: Streamlit's dark grey on a dark one) and the values that matter stand out from the
#: page (dark on light, bright on dark). ``counts``: intruder dimensions; ``similarity``:
#: |cos| of singular vectors; ``measure``: any other measure (Viridis, from yellow on a
#: light page and from purple on a dark one).
COLORSCALES: dict[str, dict[str, list[str]]] = {
    "counts": {
        "light": list(sequential.Reds),
        "dark": ["#262730", "#4d1c22", "#7f1d24", "#b8262a", "#e2462f", "#f67c4a", "#fdb07a"],
    },
    "similarity": {
        "light": list(sequential.Blues),
        "dark": ["#262730", "#1b3a5c", "#1f5a8f", "#2b7bbf", "#4f9de0", "#8cc3f0", "#d4ebff"],
    },
    "measure": {"light": list(sequential.Viridis_r), "dark": list(sequential.Viridis)},
}
#: The page backgrounds the colour scales are made for (Streamlit 1.67's light and dark
#: themes, as measured in a screenshot; Plotly's dark red top of "Reds" is 1.36:1 on the dark one).
PAGE_COLORS = {"light": "#ffffff", "dark": "#171614"}
#: Text on a coloured cell: whichever of these contrasts more with the cell.
CELL_TEXT_COLORS = ("#000000", "#ffffff")


def colorscale(kind: str, dark: bool = False) -> list[list]:
    """The colour scale for ``kind`` of value (:data:`COLORSCALES`) on a light or dark page.

    Parameters
    ----------
    kind : str
        ``counts``, ``similarity`` or ``measure``.
    dark : bool
        Whether the page is dark.

    Returns
    -------
    list of [float, str]
        A Plotly colour scale, evenly spaced stops from low to high.
    """
    colors = COLORSCALES[kind]["dark" if dark else "light"]
    return [[i / (len(colors) - 1), c] for i, c in enumerate(colors)]


def count_ticks(top: float, most: int = 5) -> dict:
    """Axis or colour-bar ticks for whole counts from 0 to ``top``: integers only, 1-2-5 steps.

    Parameters
    ----------
    top : float
        The largest count shown.
    most : int
        About how many ticks at most.

    Returns
    -------
    dict
        ``tickmode``, ``tick0``, ``dtick`` and an integer ``tickformat``.
    """
    return {"tickmode": "linear", "tick0": 0, "dtick": whole_step(max(top, 1), most), "tickformat": "d"}


#: Least pixels from a grid's bottom edge to its colour bar's title: room for the grid's
#: column names (slanted on a phone) and an expert grid's axis title.
GRID_BAR_BELOW = 64
#: Pixels a grid's colour bar takes under that: its title, the bar and its tick labels.
GRID_BAR_PX = 56
#: A grid's colour bar's length in pixels: as long as the longest measure's title
#: ("Intruder energy share (share, 0–1)", 183 px at 12 px), shorter than a phone's plot.
GRID_BAR_LEN = 240


def slanted_px(longest: int) -> int:
    """Pixels that column names of at most ``longest`` characters reach below a grid, slanted.

    Plotly slants them 45°: about 6.2 px a character, times sin 45°.
    """
    return int(6.2 * longest * 0.71)


def grid_bar_below(longest: int) -> int:
    """Pixels from a grid's bottom edge to its colour bar's title.

    For column names of at most ``longest`` characters, slanted (:func:`slanted_px`).
    """
    return max(GRID_BAR_BELOW, 24 + slanted_px(longest))


def grid_colorbar(title: str, plot_px: int, below: int = GRID_BAR_BELOW, font_size: int | None = None, **ticks) -> dict:
    """A layer grid's colour bar: lying under the grid, its title above it, :data:`GRID_BAR_LEN` px long.

    One layout for every layer grid: the series page's, the overview's and the RL-versus-SFT
    page's panels (:func:`charts.overview.overview_sections`).

    Upright beside a grid (as it was), the bar is as tall as the grid and its title, turned
    along it, was longer than a grid of few layers (the demo's 6 layers on the series page at
    390 px wide; 2-3 layers on an overview panel: a 122 px title beside an 88 px bar), and on a
    phone it took the grid's width. Lying under it (Plotly's ``orientation="h"``, title
    ``side="top"``, ``len`` in pixels, a thin ``thickness``) its title has the figure's width,
    whatever the grid's height, as the similarity chart's bar
    (:func:`charts.spectra.similarity_figure`) lies under its panels. ``plot_px`` is the
    grid's height (the plot area's), ``below`` the pixels between it and the bar's title
    (:func:`grid_bar_below`); the figure's bottom margin is ``below + GRID_BAR_PX``.
    ``font_size`` sets the title's size (the tick labels one less; the template's when
    ``None``), ``ticks`` the bar's tick settings (a count's whole numbers).
    """
    fonts = {} if font_size is None else {"tickfont": {"size": font_size - 1}}
    return {
        "title": {"text": title, "side": "top", **({} if font_size is None else {"font": {"size": font_size}})},
        "orientation": "h",
        "y": -below / plot_px,  # paper units: a fraction of the grid's height
        "yanchor": "top",
        "lenmode": "pixels",
        "len": GRID_BAR_LEN,
        "thickness": 10,
        "outlinewidth": 0,
        **fonts,
        **ticks,
    }


def whole_step(top: float, most: int) -> int:
    """The smallest 1-2-5 step (1, 2, 5, 10, 20, ...) that puts at most ``most`` ticks up to ``top``."""
    return next(s for s in (m * 10**e for e in range(12) for m in (1, 2, 5)) if top / s <= most)


def _rgb(color: str) -> tuple[float, float, float]:
    """``#rrggbb`` or ``rgb(r, g, b)`` as three numbers in 0..255."""
    if color.startswith("#"):
        return tuple(float(c) for c in hex_to_rgb(color))  # type: ignore[return-value]
    return tuple(float(c) for c in unlabel_rgb(color))  # type: ignore[return-value]


def luminance(color: str) -> float:
    """WCAG 2 relative luminance of ``color`` (``#rrggbb`` or ``rgb(...)``).

    Parameters
    ----------
    color : str
        The colour.

    Returns
    -------
    float
        0 (black) to 1 (white).
    """
    linear = [c / 255 / 12.92 if c / 255 <= 0.04045 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in _rgb(color)]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two colours, 1 (same) to 21 (black on white).

    Parameters
    ----------
    a, b : str
        The colours.

    Returns
    -------
    float
    """
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def scale_color(scale: Sequence, value: float, low: float, high: float) -> str:
    """The colour ``scale`` gives ``value`` on a colour axis from ``low`` to ``high``.

    Parameters
    ----------
    scale : sequence of (float, str)
        A Plotly colour scale (stops ascending from 0 to 1).
    value, low, high : float
        The value and the colour axis' ends.

    Returns
    -------
    str
        ``rgb(r, g, b)``.
    """
    t = 0.0 if high <= low else min(1.0, max(0.0, (value - low) / (high - low)))
    stops = [(float(p), _rgb(c)) for p, c in scale]
    for (p0, c0), (p1, c1) in zip(stops, stops[1:], strict=False):
        if t <= p1:
            f = 0.0 if p1 <= p0 else (t - p0) / (p1 - p0)
            return "rgb({:.0f}, {:.0f}, {:.0f})".format(*(x0 + f * (x1 - x0) for x0, x1 in zip(c0, c1, strict=True)))
    return "rgb({:.0f}, {:.0f}, {:.0f})".format(*stops[-1][1])


def cell_text_colors(values: Sequence[float], scale: Sequence, low: float, high: float) -> list[str]:
    """For each value, the text colour (:data:`CELL_TEXT_COLORS`) that reads best on its cell.

    Parameters
    ----------
    values : sequence of float
        The cells' values.
    scale : sequence of (float, str)
        The cells' colour scale.
    low, high : float
        The colour axis' ends.

    Returns
    -------
    list of str
        One colour per value; its contrast with the cell is at least 4.5:1 for any cell colour.
    """
    out = []
    for value in values:
        cell = scale_color(scale, value, low, high)
        out.append(max(CELL_TEXT_COLORS, key=lambda text, cell=cell: contrast(text, cell)))
    return out


def _scale_key(scale) -> tuple[str, ...] | None:
    """The colours of a Plotly colour scale (as stored in a figure), to recognise it."""
    if not scale or isinstance(scale, str):
        return None
    return tuple(str(c).replace(" ", "").lower() for _, c in scale)


_DARK_TWIN = {
    tuple(c.replace(" ", "").lower() for c in scales["light"]): scales["dark"] for scales in COLORSCALES.values()
}


def themed(fig: go.Figure, dark: bool) -> go.Figure:
    """``fig`` with its colour scales and cell text for a dark page (unchanged on a light one).

    Every colour scale of :data:`COLORSCALES` (on a trace, a frame's trace or a shared
    colour axis) becomes its dark twin, and the text written on cells (a trace whose
    ``meta`` is ``{"role": "cell-text", ...}``, from :func:`cell_text`) takes the colour
    that reads best on its cell in the new scale: the changes :func:`dark_patch` lists,
    applied. The one place that knows the page's theme (the dashboard's chart view) calls
    this; figures are drawn for a light page.

    Parameters
    ----------
    fig : plotly.graph_objects.Figure
        A figure of :mod:`charts`; changed in place.
    dark : bool
        Whether the page is dark.

    Returns
    -------
    plotly.graph_objects.Figure
        ``fig``.
    """
    if not dark:
        return fig
    patch = dark_patch(fig)
    for path, value in patch["layout"].items():
        fig.layout[path] = value
    for index, changes in patch["data"].items():
        for path, value in changes.items():
            fig.data[int(index)][path] = value
    for frame in fig.frames or ():
        for trace in frame.data:
            if "colorscale" in trace and (twin := _dark_twin(trace.colorscale)):
                trace.colorscale = twin
    return fig


def _dark_twin(scale) -> list[list] | None:
    """The dark twin of one of :data:`COLORSCALES`' light scales (None for any other scale)."""
    twin = _DARK_TWIN.get(_scale_key(scale))
    return [[i / (len(twin) - 1), c] for i, c in enumerate(twin)] if twin else None


def dark_patch(fig: go.Figure) -> dict:
    """What a dark page changes in ``fig``, as Plotly attribute paths and their new values.

    The dark twin of each colour scale of :data:`COLORSCALES` on a shared colour axis or a
    trace, and each cell-text trace's colours (:func:`cell_text`) on the swapped scale where
    they differ. :func:`themed` applies it for the dashboard; the one-file HTML report
    carries it beside each figure (drawn for a light page) and its own script sets each
    path to its value when the reader's scheme is dark, and back to the figure's own value
    when it is light. Frames are not in it (:func:`themed` swaps theirs).

    Parameters
    ----------
    fig : plotly.graph_objects.Figure
        A figure of :mod:`charts`, drawn for a light page; not changed.

    Returns
    -------
    dict
        ``{"layout": {path: value}, "data": {trace index (str): {path: value}}}`` with
        Plotly's dotted attribute paths (``coloraxis.colorscale``, ``textfont.color``),
        in a fixed order; empty dicts where nothing changes.
    """
    layout = {}
    for name in sorted(n for n in fig.layout if n.startswith("coloraxis")):
        if twin := _dark_twin(fig.layout[name].colorscale):
            layout[f"{name}.colorscale"] = twin
    data = {}
    for index, trace in enumerate(fig.data):
        changes = {}
        if "colorscale" in trace and (twin := _dark_twin(trace.colorscale)):
            changes["colorscale"] = twin
        meta = trace.meta if isinstance(trace.meta, dict) else {}
        if meta.get("role") == "cell-text":
            axis = meta["coloraxis"]
            scale = layout.get(f"{axis}.colorscale") or fig.layout[axis].colorscale
            colors = cell_text_colors(meta["values"], scale, meta["low"], meta["high"])
            if colors != list(trace.textfont.color):
                changes["textfont.color"] = colors
        if changes:
            data[str(index)] = changes
    return {"layout": layout, "data": data}


def cell_text(x, y, text: Sequence[str], values: Sequence[float], scale, low: float, high: float, **font) -> go.Scatter:
    """Words written on heatmap cells, each in the colour that reads best on its cell.

    A Plotly heatmap writes every cell's text in one colour (a theme's grey on green and
    yellow is unreadable), so the text is a scatter trace of its own with a colour per
    cell; :func:`themed` recolours it when the scale changes for a dark page. The trace's
    colour axis must be ``coloraxis`` of the figure.

    Parameters
    ----------
    x, y : array-like
        The cells' positions.
    text : sequence of str
        What each cell says.
    values : sequence of float
        The cells' values (their colours).
    scale : sequence of (float, str)
        The colour scale of the figure's ``coloraxis``.
    low, high : float
        The colour axis' ends.
    **font
        Further text font properties (``size``).

    Returns
    -------
    plotly.graph_objects.Scatter
        A text-only trace that takes no hover and no clicks.
    """
    values = [float(v) for v in values]
    return go.Scatter(
        x=x,
        y=y,
        text=list(text),
        mode="text",
        textfont={"color": cell_text_colors(values, scale, low, high), **font},
        hoverinfo="skip",
        showlegend=False,
        meta={"role": "cell-text", "coloraxis": "coloraxis", "values": values, "low": low, "high": high},
    )
