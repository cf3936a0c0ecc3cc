"""The HTML report: one file that shows a comparison offline, in any browser, without a server.

Results in, an HTML string out (no Streamlit, no I/O): the overview grids, intruders vs
eps, effective rank and rank90 by layer, the spectra and similarity heatmaps of the
matrices that changed most, the per-fine-tune totals, and what is needed to reproduce it
(:mod:`analysis.provenance`). Every chart is the dashboard's own Plotly figure
(:mod:`charts.overview`, :mod:`charts.comparison`, :mod:`charts.spectra`), as interactive as
there (hover, zoom), drawn by the one copy of plotly.js embedded in the file
(``plotly.offline.get_plotlyjs()``): no CDN, no MathJax, no fonts, no request of any kind
(a Content-Security-Policy forbids them). The page follows the reader's light or dark
preference (``prefers-color-scheme``), and follows it when the reader switches: a few lines of
inline script give the figures the matching template and, on a dark page, the dashboard's dark
colour scales (each figure carries its :func:`charts.colors.dark_patch`: zero cells in the page's
tone, the cells that matter bright, cell text recoloured). It fits a 390 px phone (figures take the
page's width).

Size: plotly.js is about 4.6 MiB of the file; the figures add little, since the dashboard's
thinning applies (spectra sampled log-evenly to :data:`charts.style.MAX_SPECTRUM_POINTS`,
heatmaps reduced by block maxima to :data:`charts.style.MAX_HEATMAP_SIDE` a side) and arrays
travel as base64 binary, floats as float32.
"""

from __future__ import annotations

import html
import json
import math
import shlex
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs, get_plotlyjs_version

from analysis.cache import SpectrumCache
from analysis.provenance import Provenance, StoredModel
from analysis.results import ComparisonResult, MatrixResult, ModelResult
from charts import colors, comparison, overview, overview_tables, rl_measures, rl_tables, spectra, style, tables

#: How many matrices per fine-tune get their spectrum and similarity heatmap.
TOP_MATRICES = 3
#: The overview grids the report holds, by metric.
GRID_METRICS = ("intruders", "effective_rank")
#: Layout keys taken from Plotly's own light and dark templates (the rest of a template is
#: for trace types the report does not draw, and would be repeated in every figure).
_TEMPLATE_KEYS = (
    "autotypenumbers",
    "font",
    "hovermode",
    "hoverlabel",
    "paper_bgcolor",
    "plot_bgcolor",
    "coloraxis",
    "xaxis",
    "yaxis",
    "shapedefaults",
    "annotationdefaults",
    "title",
)
#: Nothing may be fetched: scripts and styles are inline, images (a chart's PNG download) data URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
    "connect-src 'none'; font-src 'none'; form-action 'none'; base-uri 'none'"
)

_CSS = """
:root { color-scheme: light dark; --bg: #fff; --fg: #1f2430; --muted: #5b6272; --line: #dde1e8;
  --panel: #f6f7f9; --accent: #1f77b4; }
@media (prefers-color-scheme: dark) {
  :root { --bg: rgb(17,17,17); --fg: #e8eaef; --muted: #a3a9b6; --line: #343a46; --panel: #1c1f25;
    --accent: #6fb2ea; }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 16px 12px 48px; }
h1 { font-size: 1.6em; margin: 0.3em 0; } h2 { font-size: 1.3em; margin: 1.6em 0 0.3em;
  border-bottom: 1px solid var(--line); padding-bottom: 0.2em; } h3 { font-size: 1.05em; margin: 1.2em 0 0.2em; }
p, li { max-width: 75ch; } .muted { color: var(--muted); font-size: 0.92em; }
code { font-size: 0.9em; overflow-wrap: anywhere; }
a { color: var(--accent); }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.93em; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px 4px 0; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.settings { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0.5em 0; }
dl.settings dt { color: var(--muted); } dl.settings dd { margin: 0; overflow-wrap: anywhere; }
.grid { display: grid; gap: 8px; grid-template-columns: repeat(auto-fill, minmax(min(100%, var(--min)), 1fr)); }
.chart { width: 100%; margin: 4px 0 12px; }
nav ul { padding-left: 1.2em; margin: 0.3em 0; } nav li { margin: 0; }
@media (max-width: 600px) { body { font-size: 14px; } main { padding: 8px 6px 32px; }
  dl.settings { grid-template-columns: 1fr; } dl.settings dd { margin-bottom: 6px; }
  table { font-size: 0.84em; } th, td { padding-right: 6px; } }
"""

# Draws every figure with the template of the reader's colour scheme, and again when it changes; a
# figure's "dark" patch (charts.colors.dark_patch: the dark twins of its colour scales, its cell text
# recoloured) is applied on a dark page and undone on a light one.
_SCRIPT = """
(function () {
  var T = JSON.parse(document.getElementById("wse-templates").textContent);
  var dark = window.matchMedia ? window.matchMedia("(prefers-color-scheme: dark)") : null;
  var narrow = window.matchMedia ? window.matchMedia("(max-width: 600px)") : null;
  var config = JSON.parse(document.getElementById("wse-config").textContent);
  function theme() {  // a phone gets narrower side margins where a figure sets none
    var t = JSON.parse(JSON.stringify(dark && dark.matches ? T.dark : T.light));
    if (narrow && narrow.matches) { t.layout.margin = {l: 60, r: 16}; }
    return t;
  }
  function copy(v) { return v === undefined ? undefined : JSON.parse(JSON.stringify(v)); }
  function get(o, path) {
    var keys = path.split(".");
    for (var i = 0; i < keys.length && o != null; i++) { o = o[keys[i]]; }
    return o;
  }
  function put(o, path, value) {  // a fresh copy each time, so that Plotly.react sees the change
    var keys = path.split("."), last = keys.pop();
    keys.forEach(function (k) { if (o[k] == null || typeof o[k] !== "object") { o[k] = {}; } o = o[k]; });
    if (value === undefined) { delete o[last]; } else { o[last] = copy(value); }
  }
  function scheme(chart, data, layout) {  // the colours of the reader's scheme on a figure
    var patch = dark && dark.matches ? chart.dark : chart.light;
    Object.keys(patch.layout).forEach(function (p) { put(layout, p, patch.layout[p]); });
    Object.keys(patch.data).forEach(function (i) {
      Object.keys(patch.data[i]).forEach(function (p) { put(data[+i], p, patch.data[i][p]); });
    });
  }
  var charts = [];
  document.querySelectorAll("script[data-figure]").forEach(function (s) {
    var fig = JSON.parse(s.textContent), div = document.getElementById(s.getAttribute("data-figure"));
    var chart = {div: div, dark: fig.dark || {layout: {}, data: {}}, light: {layout: {}, data: {}}};
    Object.keys(chart.dark.layout).forEach(function (p) { chart.light.layout[p] = copy(get(fig.layout, p)); });
    Object.keys(chart.dark.data).forEach(function (i) {
      chart.light.data[i] = {};
      Object.keys(chart.dark.data[i]).forEach(function (p) { chart.light.data[i][p] = copy(get(fig.data[+i], p)); });
    });
    scheme(chart, fig.data, fig.layout);
    fig.layout.template = theme();
    var c = Object.assign({}, config, {toImageButtonOptions: Object.assign({}, config.toImageButtonOptions,
      {filename: div.id})});
    Plotly.newPlot(div, fig.data, fig.layout, c);
    charts.push(chart);
  });
  function recolour() {
    charts.forEach(function (chart) {
      var div = chart.div, layout = Object.assign({}, div.layout, {template: theme()});
      scheme(chart, div.data, layout);
      Plotly.react(div, div.data, layout);
    });
  }
  [dark, narrow].forEach(function (m) {
    if (m) { m.addEventListener ? m.addEventListener("change", recolour) : m.addListener(recolour); }
  });
})();
"""


def plotly_config() -> dict:
    """The config of every chart: responsive, a PNG download, no link to any web site.

    Returns
    -------
    dict
        A plotly.js ``config`` (the PNG's file name is set per chart).
    """
    return {
        "responsive": True,
        "displaylogo": False,
        "showLink": False,
        "showSendToCloud": False,
        "showEditInChartStudio": False,
        "modeBarButtonsToRemove": ["select2d", "lasso2d"],
        "toImageButtonOptions": {"format": "png", "scale": 2},
    }


def page_templates() -> dict:
    """Light and dark layout templates, trimmed from Plotly's ``plotly_white`` and ``plotly_dark``.

    Returns
    -------
    dict
        ``{"light": template, "dark": template}``, each ``{"layout": {...}}`` with the
        dashboard's colours (:data:`charts.style.PALETTE`) as colourway.
    """
    out = {}
    for name, source in (("light", "plotly_white"), ("dark", "plotly_dark")):
        layout = pio.templates[source].layout.to_plotly_json()
        kept = {key: layout[key] for key in _TEMPLATE_KEYS if key in layout}
        kept["colorway"] = list(style.PALETTE)
        out[name] = {"layout": kept}
    return out


def _float32(value):
    """``value`` with every float64 array (nested in dicts and lists) as float32: half the bytes."""
    if isinstance(value, np.ndarray):
        return value.astype(np.float32) if value.dtype == np.float64 else value
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_float32(v) for v in value]
    return value


def figure_json(fig: go.Figure) -> str:
    """``fig`` as the JSON a ``<script>`` element can hold: no template, float32 arrays, ``</`` escaped.

    Parameters
    ----------
    fig : plotly.graph_objects.Figure
        Any figure of :mod:`charts`.

    Returns
    -------
    str
        ``{"data": [...], "layout": {...}}`` drawn for a light page, and ``"dark"``: what
        changes on a dark one (:func:`charts.colors.dark_patch`) where anything does; the
        page adds the reader's template.
    """
    data = fig.to_plotly_json()
    data["layout"].pop("template", None)
    data["layout"].pop("width", None)  # the page's width
    data["data"] = [_float32(trace) for trace in data["data"]]
    patch = colors.dark_patch(fig)
    if patch["layout"] or patch["data"]:
        data["dark"] = patch
    return pio.json.to_json_plotly(data).replace("</", "<\\/")


def reproduce_command(
    result: ComparisonResult, eps: float, *, side: str = "left", include_non_block: bool = False, html_path: str = ""
) -> str:
    """The ``python -m analysis report`` command that computes ``result``'s numbers again.

    Parameters
    ----------
    result : ComparisonResult
        The comparison: base and fine-tunes as given, ``top_k`` and ``epsilons``.
    eps : float
        The ε of the HTML report.
    side : str
        The singular vectors compared, ``left`` or ``right``.
    include_non_block : bool
        Whether matrices outside the numbered blocks were analysed.
    html_path : str
        Where the command writes the HTML report (default ``report.html``).

    Returns
    -------
    str
        A shell command line (arguments quoted where needed).
    """
    words = ["python", "-m", "analysis", "report", result.base, *(m.source for m in result.models)]
    words += ["--top-k", str(result.top_k), "--epsilons", ",".join(f"{e:g}" for e in result.epsilons)]
    words += ["--eps", f"{eps:g}", "--side", side]
    if include_non_block:
        words.append("--include-non-block")
    return shlex.join([*words, "--html", html_path or "report.html"])


def changed_most(model: ModelResult, k: int, eps: float, n: int = TOP_MATRICES) -> list[MatrixResult]:
    """The ``n`` matrices of ``model`` with the most intruders at (``k``, ``eps``), ties by larger ‖ΔW‖_F.

    Parameters
    ----------
    model : ModelResult
        One fine-tune.
    k : int
        How many top tuned singular vectors are searched for intruders.
    eps : float
        The threshold on the best match below which a tuned vector is an intruder.
    n : int
        How many matrices.

    Returns
    -------
    list of MatrixResult
        Most changed first.
    """
    counted = [(m.intruder_counts(k, [eps])[0], m.delta_fro, i, m) for i, m in enumerate(model.matrices)]
    counted.sort(key=lambda c: (-c[0], -c[1], c[2]))
    return [c[3] for c in counted[:n]]


class _Page:
    """The report's body as it is written: headings, text, tables and numbered charts."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.charts = 0
        self.figure_bytes = 0
        self.toc: list[tuple[str, str]] = []

    def add(self, markup: str) -> None:
        self.parts.append(markup)

    def section(self, title: str, anchor: str) -> None:
        self.toc.append((anchor, title))
        self.add(f'<h2 id="{anchor}">{html.escape(title)}</h2>')

    def text(self, words: str, cls: str = "") -> None:
        self.add(f"<p{f' class={chr(34)}{cls}{chr(34)}' if cls else ''}>{words}</p>")

    def chart(self, fig: go.Figure, name: str) -> str:
        """A chart's element and its figure's JSON; returns the markup (placed by the caller or added)."""
        self.charts += 1
        chart_id = f"{name}-{self.charts}"
        figure = figure_json(fig)
        self.figure_bytes += len(figure.encode())
        return (
            f'<div class="chart" id="{chart_id}" role="img" aria-label="{html.escape(_plain_title(fig))}"></div>'
            f'<script type="application/json" data-figure="{chart_id}">{figure}</script>'
        )


def _plain_title(fig: go.Figure) -> str:
    """A figure's title without markup (for screen readers)."""
    text = fig.layout.title.text or ""
    for tag in ("<br>", "<sup>", "</sup>", "<b>", "</b>"):
        text = text.replace(tag, " " if tag == "<br>" else "")
    return " ".join(text.split())


def _number(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _totals(page: _Page, models: Sequence[ModelResult], k: int, eps: float) -> None:
    """The per-fine-tune totals: a table (every number exact in ``data-value``) and the bar chart."""
    page.section("Per fine-tune totals", "totals")
    table = tables.totals_table(models, k, eps)
    head = (
        "<tr><th>fine-tune</th><th>method</th><th class=num>matrices analysed</th>"
        f"<th class=num>intruder dimensions (top {k}, ε = {eps:g})</th>"
        "<th class=num>mean effective rank of ΔW</th><th class=num>mean rank90 of ΔW</th>"
        "<th>stored as (matrices)</th></tr>"
    )
    rows = []
    for model, row in zip(models, table.itertuples(), strict=True):
        cells = [
            f"<td>{html.escape(str(row.model))}</td>",
            f"<td>{html.escape(str(row.method))}</td>",
            f'<td class=num data-key="matrices" data-value="{row.matrices}">{row.matrices}</td>',
            f'<td class=num data-key="intruders" data-value="{row.intruders}">{row.intruders}</td>',
            f'<td class=num data-key="mean_effective_rank" data-value="{row.mean_effective_rank!r}">'
            f"{_number(row.mean_effective_rank)}</td>",
            f'<td class=num data-key="mean_rank90" data-value="{row.mean_rank90!r}">{_number(row.mean_rank90, 1)}</td>',
            f'<td data-key="storage">{html.escape(tables.storage_summary(model.summary) or "")}</td>',
        ]
        rows.append(f'<tr data-spec="{html.escape(model.source)}">{"".join(cells)}</tr>')
    page.add(f'<div class="table-wrap"><table id="totals"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>')
    page.add("</div>")
    page.text(
        "Sums over every analysed matrix: an intruder dimension is one of the top k singular vectors of the tuned "
        "matrix whose best |cosine| with every base singular vector is below ε (Shuttleworth et al. 2024, Def. 3.1). "
        "Effective rank (Roy &amp; Vetterli 2007) and rank90 (Biderman et al. 2024) count the directions the update "
        "ΔW uses.",
        "muted",
    )
    # The bars are named on their axis (a legend beside them took half a phone's width).
    bars = overview.totals_figure(models, k, eps).update_layout(showlegend=False)
    page.add(page.chart(bars, "totals"))
    page.text("Hatched bars: LoRA fine-tunes; plain: full fine-tuning.", "muted")


def _grids(page: _Page, models: Sequence[ModelResult], k: int, eps: float) -> None:
    """The overview's grids, one per metric of :data:`GRID_METRICS`, a panel per fine-tune."""
    labels = tables.model_labels(models)
    for metric in GRID_METRICS:
        page.section(f"Overview: {overview.overview_title(metric, k, eps)}", f"grid-{metric}")
        name = overview_tables.OVERVIEW_METRICS[metric]
        what = name[:1].lower() + name[1:]  # "intruder dimensions", "effective rank of ΔW"
        page.text(f"Each cell is one weight matrix of one fine-tune, coloured by its {what}; hover a cell to name it.")
        for section in overview.overview_sections(models, metric, k, eps):
            if len(section.panels) and section.title:
                page.add(f"<h3>{html.escape(section.title)}</h3>")
            missing = [labels[i] for i in range(len(models)) if i not in section.model_indices]
            if missing:
                page.text("No matrix of this grid was analysed for " + html.escape(", ".join(missing)) + ".", "muted")
            width = {3: "300px", 2: "460px"}.get(section.columns, "100%")
            charts = "".join(page.chart(fig, f"grid-{metric}") for fig in section.panels)
            page.add(f'<div class="grid" style="--min: {width}">{charts}</div>')


def _comparisons(page: _Page, result: ComparisonResult, eps: float, cache: SpectrumCache | None) -> None:
    """Intruders against ε, then effective rank and rank90 by layer."""
    models, k = result.models, result.top_k
    epsilons = sorted({*map(float, result.epsilons), float(eps)})
    page.section("Intruder dimensions vs ε", "sweep")
    page.text(
        f"Intruder dimensions among the top {k} tuned singular vectors, summed over every matrix, at each ε "
        f"({', '.join(f'{e:g}' for e in epsilons)}); the dotted line marks ε = {eps:g}, the ε of the grids and totals."
    )
    sweep = rl_measures.add_chance_band(comparison.sweep_figure(models, k, epsilons, eps), models, cache)
    page.add(page.chart(sweep, "sweep"))
    page.section("Effective rank and rank90 by layer", "rank")
    page.text(
        "Effective rank (Roy &amp; Vetterli 2007) and rank90 (the fewest singular values holding 90% of ‖ΔW‖²_F, "
        "Biderman et al. 2024) of every update ΔW, on log axes; one facet per module, one series per fine-tune, "
        "a dotted line at each LoRA's rank r."
    )
    page.add(page.chart(comparison.effective_rank_figure(models, "effective_rank"), "effective-rank"))
    page.add(page.chart(comparison.effective_rank_figure(models, "rank90"), "rank90"))


def _matrices(page: _Page, models: Sequence[ModelResult], k: int, eps: float) -> None:
    """Spectra and similarity heatmaps of each fine-tune's :func:`changed_most` matrices."""
    page.section("The matrices that changed most", "matrices")
    page.text(
        f"Per fine-tune, the {TOP_MATRICES} matrices with the most intruder dimensions at top {k}, ε = {eps:g} "
        "(ties: the larger ‖ΔW‖_F). For each: the singular values of base, tuned and update (spectra of more than "
        f"{style.MAX_SPECTRUM_POINTS} values are sampled log-evenly, intruders always kept), and |Uₜᵀ U₀|, the "
        "cosines between tuned and base singular vectors, beside each tuned vector's best match (heatmaps larger "
        f"than {style.MAX_HEATMAP_SIDE}×{style.MAX_HEATMAP_SIDE} are reduced by block maxima)."
    )
    for label, model in zip(tables.model_labels(models), models, strict=True):
        method = html.escape(tables.training_method(model))
        page.add(f"<h3>{html.escape(label)} <span class=muted>({method})</span></h3>")
        for matrix in changed_most(model, k, eps):
            pair = page.chart(spectra.spectrum_figure(matrix, k, eps, label), "spectrum") + page.chart(
                spectra.similarity_figure(matrix, k, eps, label), "similarity"
            )
            page.add(f'<div class="grid" style="--min: 520px">{pair}</div>')


#: How the provenance table names a model's role.
ROLES = {"base": "base", "full": "fine-tune (full weights)", "adapter": "LoRA adapter"}


def _stored(model: StoredModel) -> str:
    return ", ".join(f"{name} ({count} tensor{'s' if count != 1 else ''})" for name, count in model.dtypes.items())


def _provenance(page: _Page, result: ComparisonResult, provenance: Provenance | None) -> None:
    """Every model as given, how it is stored, what it holds; what the file thinned."""
    page.section("Provenance", "provenance")
    if provenance is None:
        page.text("The models' stored dtypes and content digests were not recorded for this report.", "muted")
    else:
        labels = dict(zip((m.source for m in result.models), tables.model_labels(result.models), strict=True))
        rows = [
            f'<tr data-spec="{html.escape(m.spec)}"><td>{html.escape(ROLES.get(m.role, m.role))}</td>'
            f"<td><code>{html.escape(m.spec)}"
            f"</code>{'' if labels.get(m.spec, m.spec) == m.spec else '<br>' + html.escape(labels[m.spec])}</td>"
            f"<td>{html.escape(_stored(m))}</td><td class=num>{m.matrices}</td>"
            f"<td><code>{html.escape(m.digest)}</code></td></tr>"
            for m in provenance.models
        ]
        head = (
            "<tr><th>role</th><th>model as given</th><th>stored as (dtypes in the file headers)</th>"
            "<th class=num>matrices analysed</th><th>content digest</th></tr>"
        )
        page.add(f'<div class="table-wrap"><table id="provenance"><thead>{head}</thead>')
        page.add(f"<tbody>{''.join(rows)}</tbody></table></div>")
        page.text(f"Content digest: {html.escape(provenance.digest_rule)}.", "muted")
    page.text(
        f"This file embeds plotly.js {html.escape(get_plotlyjs_version())} ({len(get_plotlyjs()) / 2**20:.1f} MiB) "
        f"once for all {page.charts} charts, whose data take {page.figure_bytes / 2**10:.0f} KiB; it makes no "
        "network request. "
        f"Thinned for size: spectra to at most {style.MAX_SPECTRUM_POINTS} points each (log-even samples), heatmaps "
        f"to at most {style.MAX_HEATMAP_SIDE}×{style.MAX_HEATMAP_SIDE} cells (block maxima), chart data as float32.",
        "muted",
    )


def _header(page: _Page, result: ComparisonResult, eps: float, provenance, settings: Mapping[str, str]) -> None:
    """Title, what was compared and every setting."""
    n = len(result.models)
    page.add("<h1>Weight spectrum report</h1>")
    page.text(
        f"What fine-tuning did to the weights of <code>{html.escape(result.base)}</code>: {n} fine-tune"
        f"{'s' if n != 1 else ''} compared with it matrix by matrix (Weight Spectrum Explorer)."
    )
    fine_tunes = "<br>".join(
        f"<code>{html.escape(m.source)}</code> ({html.escape(tables.training_method(m))})" for m in result.models
    )
    rows = {
        "base": f"<code>{html.escape(result.base)}</code>",
        "fine-tunes": fine_tunes,
        "k (top tuned singular vectors checked)": str(result.top_k),
        "ε (similarity threshold)": f"{eps:g}",
        **{html.escape(key): html.escape(str(value)) for key, value in settings.items()},
    }
    if provenance is not None:
        rows["tool version"] = f"Weight Spectrum Explorer {html.escape(provenance.version)}"
        rows["created"] = html.escape(provenance.created)
    items = "".join(f"<dt>{key}</dt><dd>{value}</dd>" for key, value in rows.items())
    page.add(f'<dl class="settings" id="settings">{items}</dl>')


def _rl_measures(page: _Page, result: ComparisonResult, eps: float) -> None:
    """The RL-versus-SFT measures per fine-tune (issue 23), in the shape of Zhu et al. 2025 Table 1."""
    models, k = result.models, result.top_k
    table = rl_tables.sparsity_table(models, result.base, k, eps)
    if table.empty or table["counts"].eq("not computed").all():
        return
    page.section("RL vs SFT measures", "rl-measures")
    head = (
        "<tr><th>base</th><th>fine-tune</th><th>method</th><th class=num>update sparsity, Zhu Eq. 1 (%)</th>"
        "<th class=num>update sparsity, |ΔW| ≤ atol in bf16 (%)</th><th>parameters counted</th>"
        "<th class=num>largest principal angle (°)</th><th class=num>mean principal-mask overlap</th>"
        f"<th class=num>intruder energy share (top {k}, ε = {eps:g})</th></tr>"
    )
    rows = []
    for row in table.itertuples():
        cells = [html.escape(str(v)) for v in (row.base, row.fine_tune, row.method)]
        numbers = [(row.sparsity_pct, 2), (row.sparsity_abs_pct, 2)]
        later = [(row.max_principal_angle_deg, 4), (row.mean_mask_overlap, 3), (row.intruder_energy_share, 3)]
        rows.append(
            "<tr>" + "".join(f"<td>{c}</td>" for c in cells)
            + "".join(f"<td class=num>{_number(v, d)}</td>" for v, d in numbers)
            + f"<td>{html.escape(str(row.counts))}</td>"
            + "".join(f"<td class=num>{_number(v, d)}</td>" for v, d in later) + "</tr>"
        )  # fmt: skip
    page.add(f'<div class="table-wrap"><table id="rl-measures"><thead>{head}</thead><tbody>{"".join(rows)}')
    page.add("</tbody></table></div>")
    page.text(
        "Update sparsity: the share of parameters left unchanged, by Zhu et al. 2025 Eq. 1 (|w₁ − w₀| ≤ "
        "η·max(|w₀|, |w₁|)) and by Mukherjee et al. 2025 (|ΔW| ≤ atol, in bf16); the principal angles between the "
        "top-k singular subspaces of W₀ and W₁ (Zhu et al. Sec. 4.1); the share of changed entries inside the "
        "principal mask of W₀ (Sec. 4.2; its chance level is α); the intruder energy share is this tool's measure.",
        "muted",
    )
    page.add(page.chart(rl_measures.sparsity_figure(models, result.base, k, eps), "rl-sparsity"))


def html_report(
    result: ComparisonResult,
    eps: float,
    *,
    provenance: Provenance | None = None,
    settings: Mapping[str, str] | None = None,
    cache: SpectrumCache | None = None,
) -> str:
    """The whole report as one self-contained HTML page.

    Parameters
    ----------
    result : ComparisonResult
        The comparison: its base, ``top_k`` (the k of every count) and ``epsilons`` (the
        sweep's ε grid), and its fine-tunes.
    eps : float
        The ε of the grids, the totals and the matrix charts (added to the sweep's grid).
    provenance : Provenance, optional
        Stored dtypes, content digests, version and date (:func:`analysis.provenance.comparison_provenance`).
    settings : mapping of str to str, optional
        Further settings to list (the singular vectors compared, the command that made it).
    cache : SpectrumCache, optional
        Where the chance level of the intruder scores is kept (:func:`analysis.chance.chance_level`).

    Returns
    -------
    str
        The page: plotly.js embedded once, every figure as JSON beside its element.
    """
    page = _Page()
    _header(page, result, eps, provenance, settings or {})
    body_start = len(page.parts)
    models, k = result.models, result.top_k
    _totals(page, models, k, eps)
    _grids(page, models, k, eps)
    _comparisons(page, result, eps, cache)
    _rl_measures(page, result, eps)
    _matrices(page, models, k, eps)
    _provenance(page, result, provenance)
    toc = "".join(f'<li><a href="#{anchor}">{html.escape(title)}</a></li>' for anchor, title in page.toc)
    page.parts.insert(body_start, f"<nav><ul>{toc}</ul></nav>")
    title = f"Weight spectrum report: {result.base}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="Weight Spectrum Explorer">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
        f"<script>{get_plotlyjs()}</script></head>\n<body><main>{''.join(page.parts)}</main>"
        f'<script type="application/json" id="wse-templates">{json.dumps(page_templates())}</script>'
        f'<script type="application/json" id="wse-config">{json.dumps(plotly_config())}</script>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
