"""Streamlit glue shared by the pages: results of the selection, progress, charts, downloads.

A page reads top to bottom as: ``selection, results = views.results()`` (starts or joins
the analysis, shows progress and errors, stops the page until something is there to
show), draw the selection controls it uses, then charts and tables from
the chart modules of :mod:`charts` and :mod:`charts.tables`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import pandas as pd
import streamlit as st

from analysis.errors import InputError
from analysis.plan import StoredDigest
from analysis.provenance import comparison_provenance
from analysis.report import to_report
from analysis.results import DEFAULT_EPSILONS, ComparisonResult, MatrixResult, ModelResult
from analysis.specs import SpecResolver
from charts import colors, overview, style, table_words, tables
from charts.html_report import html_report, reproduce_command
from hosting.jobs import JobState
from ui import demo_build, runtime, state
from ui.state import Selection
from ui.text import escape_markdown

#: Seconds between progress polls of a watching page (each poll is a fragment run of every
#: watching session in this one process, beside the analyses themselves).
POLL_SECONDS = 2.0
#: While results stream in, redraw the page with them at most this often.
REDRAW_SECONDS = 2.5

MODELS_PAGE = "pages/models.py"


def progress(base: str, tracked: Sequence[runtime.Tracked]) -> None:
    """Live progress of the running analyses (if any), polled without blocking the page."""
    st.session_state.wse_drawn = _signature(tracked)
    st.session_state.wse_drawn_at = time.time()
    if any(t.job is not None and not t.job.state.finished for t in tracked):
        _progress(base, tuple(t.spec for t in tracked))


@st.fragment(run_every=POLL_SECONDS)
def _progress(base: str, specs: tuple[str, ...]) -> None:
    """Progress bars and Cancel, refreshed every second without redrawing the page."""
    tracked = runtime.track(base, specs, start=False)
    running = [t for t in tracked if t.job is not None and not t.job.state.finished]
    waiting = []
    for t in running:
        p = t.job.progress
        if t.job.state is JobState.QUEUED or p is None:
            waiting.append(runtime.resolver().label(t.spec))
            continue
        label = escape_markdown(runtime.resolver().label(t.spec))
        eta = f", about {p.eta_s:.0f} s left" if p.eta_s is not None and p.done < p.total else ""
        st.progress(p.fraction, text=f"{label}: {p.done} of {p.total} matrices{eta}")
    if waiting:  # one line for everything not started yet, not a bar each
        ours = {id(t.job) for t in running}
        others = sum(1 for j in runtime.manager().jobs() if j.state is JobState.RUNNING and id(j) not in ours)
        st.caption(_waiting_line(waiting, started=len(running) > len(waiting), others=others))
    if running:
        st.button("Cancel", key="cancel_jobs", on_click=_cancel, help="Stop the analyses this page started")
    signature = _signature(tracked)
    last = st.session_state.get("wse_drawn")
    drawn_at = st.session_state.get("wse_drawn_at", 0.0)
    finished_changed = last is None or [s[1] for s in signature] != [s[1] for s in last]
    if signature != last and (finished_changed or time.time() - drawn_at > REDRAW_SECONDS):
        st.rerun()


def _waiting_line(labels: list[str], *, started: bool, others: int) -> str:
    """What is queued, in one line (``Next: a, b, c (...)``), not a progress bar each."""
    names = escape_markdown(", ".join(labels))
    if started:
        return f"Next: {names} (each starts when a worker is free)"
    if others:
        return f"Queued: {names}, after {others} other {'analysis' if others == 1 else 'analyses'} on this server"
    return f"Starting the analysis of {names}…"


def _cancel() -> None:
    """Withdraw this session from its jobs; a job stops when nobody else watches it."""
    runtime.manager().unwatch_all(runtime.session_id())


def _signature(tracked: Sequence[runtime.Tracked]) -> list[tuple[str, str | None, int]]:
    return [(t.spec, t.state.value if t.state else None, len(t.job.items()) if t.job else 0) for t in tracked]


def results() -> tuple[Selection, list[ModelResult]]:
    """The selection and the results there are for it, or stop the page with why not.

    Starts (or joins) the analysis of every chosen fine-tune, shows live progress while
    it runs, says plainly which inputs failed, and returns the results available so far
    (finished ones, and the matrices done of running ones).
    """
    state.ensure_app_navigation()
    selection = state.current()
    demo_build_status()
    if not selection.complete:
        job = demo_build.demo_job()
        if demo_build.DEMO_FOLLOW in st.session_state and job is not None and not job.state.finished:
            st.caption("The offline demo's first results appear here as soon as its first fine-tune is trained.")
            st.stop()
        st.info("Choose a base model and at least one fine-tune first.")
        st.page_link(MODELS_PAGE, label="Choose models", icon=":material/folder_open:")
        st.stop()
    tracked = runtime.track(selection.base, selection.tuned, start=True)
    for t in tracked:
        label = escape_markdown(runtime.resolver().label(t.spec))
        if t.refused:
            st.warning(f"**{label}**: {escape_markdown(t.refused)}")
        elif t.state is JobState.FAILED:
            st.error(f"**{label}** could not be analysed: {escape_markdown(error_text(t))}")
        elif t.state is JobState.CANCELLED:
            st.warning(f"The analysis of **{label}** was cancelled.")
    progress(selection.base, tracked)
    # Each result's ``source`` is its spec as in the URL (never a resolved server path).
    models = [r for r in (t.result() for t in tracked) if r is not None]
    if not any(m.matrices for m in models):
        if any(t.state in (JobState.FAILED, JobState.CANCELLED) for t in tracked):
            st.page_link(MODELS_PAGE, label="Check the models and run again", icon=":material/folder_open:")
        else:
            st.caption("The first results appear here as soon as they are computed.")
        st.stop()
    return selection, models


def error_text(t: runtime.Tracked) -> str:
    """A failed job's error as a visitor may see it, without the spec the page names."""
    return runtime.friendly(t.job.error or "", runtime.resolver().label(t.spec), spec=t.spec)


def max_k(models: Sequence[ModelResult]) -> int:
    """The largest ``k`` every analysed matrix has scores for."""
    lengths = [len(m.intruder_scores) for model in models for m in model.matrices]
    return max(1, min(lengths, default=state.MAX_K))


def k_eps_controls(models: Sequence[ModelResult]) -> tuple[int, float]:
    """Sidebar sliders for ``k`` and ``eps`` (shared by every page that counts intruders)."""
    # While results stream in, the matrices so far may offer fewer than the link's k:
    # the slider shows what there is, the view keeps what its link asked for.
    top = max(2, min(state.MAX_K, max_k(models)))
    wanted = state.get("k")
    with st.sidebar:
        k = state.widget(
            st.slider,
            "k: top tuned singular vectors checked",
            "k",
            shown=top if wanted > top else None,
            min_value=1,
            max_value=top,
            help="Intruders are sought among the top-k singular vectors of each tuned matrix.",
        )
        eps = state.widget(
            st.slider,
            "ε: similarity threshold",
            "eps",
            min_value=state.EPS_STEP,
            max_value=0.95,
            step=state.EPS_STEP,
            format="%.2f",
            help="A tuned singular vector whose best |cosine| with every base singular vector is "
            "below ε is an intruder dimension (Shuttleworth et al. 2024, Def. 3.1).",
        )
    return int(k), float(eps)


def model_control(models: Sequence[ModelResult], label: str = "Fine-tune", name: str = "model") -> ModelResult:
    options = [m.source for m in models]
    labels = dict(zip(options, tables.model_labels(models), strict=True))
    with st.sidebar:
        spec = state.widget(st.selectbox, label, name, options=options, format_func=lambda s: labels.get(s, s))
    return next(m for m in models if m.source == spec)


def matrix_control(models: Sequence[ModelResult]) -> str:
    """Sidebar choice of one matrix (by stack, layer, module and expert), shared by the
    detail pages; returns its :attr:`analysis.identity.MatrixId.key`."""
    seen: dict[str, MatrixResult] = {}
    for model in models:
        for m in model.matrices:
            seen.setdefault(m.key, m)
    names = [m.key for m in tables.identity_order(seen.values())]

    with st.sidebar:
        return state.widget(
            st.selectbox,
            "Matrix",
            "matrix",
            options=names,
            format_func=lambda key: tables.describe_matrix(seen[key]) if key in seen else key,
            help="Where the weight matrix shown on this page lives: stack, layer, module, expert.",
        )


def find_matrix(model: ModelResult, key: str) -> MatrixResult | None:
    """The matrix of ``model`` with this :attr:`analysis.identity.MatrixId.key`, if analysed."""
    return next((m for m in model.matrices if m.key == key), None)


def chart(fig, name: str, **kwargs) -> object:
    """A Plotly chart with a PNG download in its toolbar, named after the view.

    Streamlit's chart theme follows the visitor's light or dark theme (fonts, grid,
    background); the figures' colour scales are drawn for a light page and swapped for
    their dark twins on a dark one (:func:`charts.colors.themed`).
    """
    kwargs.setdefault("theme", "streamlit")
    colors.themed(fig, dark_page())
    return st.plotly_chart(fig, config=style.chart_config(name), **kwargs)


def dark_page() -> bool:
    """Whether the visitor's page is dark (Streamlit's theme; light until the browser says)."""
    theme = getattr(st.context, "theme", None)
    return getattr(theme, "type", None) == "dark"


def table(
    frame: pd.DataFrame,
    name: str,
    *,
    label: str = "Download CSV",
    index: bool = False,
    words: dict[str, tuple[str, str]] | None = None,
    **kwargs,
) -> None:
    """A table and its CSV download (exactly the numbers computed; ``index`` for matrices).

    On screen (:func:`display_table`): columns no row fills are left out (``stack`` of a
    one-stack model, ``expert`` of a dense one, ``method`` where every name says it), the rest
    are named in words (:data:`charts.table_words.COLUMN_WORDS`, with ``words`` replacing
    some: :data:`charts.table_words.GROUP_COLUMN_WORDS` for a table of groups), a measure is
    in its one unit and with its one number of decimals (:data:`charts.table_words.MEASURES`:
    a sparsity in %, ``%.2f``; :func:`column_config`), and a value that
    does not exist (the amplification factor of a zero update, the λ of the base model) is a
    dash (Streamlit's ``placeholder``), not a grey "None". The CSV keeps every column under
    its short name and as computed (a sparsity as a share, 0-1), so its columns are always
    the same, and leaves missing values empty.
    """
    display = display_table(frame)
    st.dataframe(display, hide_index=not index, placeholder="—", column_config=column_config(display, words), **kwargs)
    st.download_button(
        label, frame.to_csv(index=index), file_name=f"{name}.csv", mime="text/csv", key=f"csv_{name}", on_click="ignore"
    )


def column_config(display: pd.DataFrame, words: dict[str, tuple[str, str]] | None = None) -> dict:
    """Streamlit's ``column_config`` of a :func:`display_table`: each column's words and help
    (:data:`charts.table_words.COLUMN_WORDS`, ``words`` replacing some) and, for a column of
    float numbers holding a measure, its measure's digits (:func:`charts.table_words.table_format`),
    so one measure has one number of decimals in every row of every table (Streamlit's own
    default writes up to 4 and drops trailing zeros: 0.5 beside 0.4873). A whole-number column
    (a count, a rank) stays as it is."""
    named = {**table_words.COLUMN_WORDS, **(words or {})}
    config = {}
    for column in display.columns:
        heading, help_text = named.get(column, (None, ""))
        number = table_words.table_format(column) if pd.api.types.is_float_dtype(display[column]) else None
        if number is not None:
            config[column] = st.column_config.NumberColumn(heading, help=help_text or None, format=number)
        elif heading is not None:
            config[column] = st.column_config.Column(heading, help=help_text or None)
    return config


def display_table(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` as the page shows it: the method only where a name does not say it, no empty column,
    each measure in its one unit (:data:`charts.table_words.MEASURES`: a sparsity's share in %)."""
    display = frame
    scaled = [c for c in frame.columns if c in table_words.MEASURES and table_words.MEASURES[c].scale != 1]
    if scaled:
        display = display.copy()
        for column in scaled:
            display[column] = table_words.MEASURES[column].shown(pd.to_numeric(display[column], errors="coerce"))
    if {"model", "method"} <= set(frame.columns):
        # The method only where the label does not already say it (the demo's "LoRA r=8").
        said = [tables.names_method(str(m), str(t)) for m, t in zip(frame["model"], frame["method"], strict=True)]
        if any(said):
            display = display.copy()
            display.loc[said, "method"] = ""
    empty = [c for c in display.columns if len(display) and display[c].map(_blank).all()]
    # A grid cell's place that repeats the matrix's own (the series grid: row = layer,
    # column = module, matrix = name of a dense matrix) is shown once.
    empty += [
        column
        for column, same in _REPEATED_PLACES.items()
        if len(display)
        and {column, same} <= set(display.columns)
        and (display[column].astype(str) == display[same].astype(str)).all()
    ]
    return display.drop(columns=empty) if empty else display


#: Columns of a grid cell's place and the matrix's own column they often repeat.
_REPEATED_PLACES = {"row": "layer", "column": "module", "matrix": "name"}


def _blank(value) -> bool:
    return (
        value is None
        or value is pd.NA
        or (isinstance(value, float) and value != value)
        or (isinstance(value, str) and not value)
    )


def overview_grids(
    models: Sequence[ModelResult], metric: str, k: int, eps: float, on_open: Callable[[int, str], None]
) -> None:
    """The overview's grids (:func:`charts.overview.overview_sections`), a panel per fine-tune.

    Panels have a fixed height and sit in rows of columns; Streamlit stacks columns on
    narrow screens, so a phone shows one full-width panel per row instead of slivers.
    A click on a cell calls ``on_open(model index, matrix key)``.
    """
    labels = tables.model_labels(models)
    sections = overview.overview_sections(models, metric, k, eps)
    if not sections:
        st.info("No matrices analysed yet.")

    def clicked(key: str) -> None:
        points = st.session_state[key].selection.points
        if points and "customdata" in points[0]:
            index, matrix = points[0]["customdata"][:2]
            if matrix:
                on_open(int(index), str(matrix))

    for s_index, section in enumerate(sections):
        if len(sections) > 1:
            st.markdown(f"**{escape_markdown(section.title)}**")
            missing = [escape_markdown(labels[i]) for i in range(len(models)) if i not in section.model_indices]
            if missing:
                st.caption("No matrix of this grid was analysed for " + ", ".join(missing) + ".")
        for start in range(0, len(section.panels), section.columns):
            columns = st.columns(section.columns)
            chunk = zip(columns, section.panels[start:], section.model_indices[start:], strict=False)
            for column, fig, index in chunk:
                key = f"overview_grid_{s_index}_{index}"
                with column:
                    chart(
                        fig,
                        f"overview-{metric}-{s_index}-{index}",
                        key=key,
                        on_select=lambda key=key: clicked(key),
                        selection_mode="points",
                    )


def report_json(selection: Selection, models: Sequence[ModelResult]) -> str:
    """The command line's JSON report (``analysis.report.to_report``) of what is shown.

    Intruder counts among the selected top ``k``, at the default eps grid plus the
    selected eps.
    """
    epsilons = sorted({*DEFAULT_EPSILONS, round(selection.eps, 2)})
    result = ComparisonResult(base=selection.base, top_k=selection.k, epsilons=epsilons, models=list(models))
    # A demo adapter records the server's site-packages path as its base_model_name_or_path:
    # through the one filter of server paths (specs keep their full hashes).
    # Where visitors may not name server paths, none is in what they download.
    text = json.dumps(to_report(result), indent=2, allow_nan=False, default=str)
    return text if runtime.resolver().allow_local_paths else runtime.friendly(text, short_hashes=False)


def report_html(
    selection: Selection,
    models: Sequence[ModelResult],
    resolver: SpecResolver | None = None,
    stored: StoredDigest | None = None,
) -> str:
    """The HTML report (:func:`charts.html_report.html_report`) of what is shown: the selection's base,
    fine-tunes, k and eps, with every model's stored dtypes and content digest (from ``stored``, the
    server cache's fingerprint index: nothing is read again). Resolver and index are passed in: this
    runs on the download button's own thread."""
    epsilons = sorted({*DEFAULT_EPSILONS, round(selection.eps, 2)})
    result = ComparisonResult(base=selection.base, top_k=selection.k, epsilons=epsilons, models=list(models))
    try:
        provenance = comparison_provenance(resolver or runtime.resolver(), result, stored=stored)
    except (InputError, OSError):  # a model changed or vanished since: the report says it has no provenance
        provenance = None
    settings = {
        "singular vectors compared": f"{runtime.SETTINGS.side} (the output space)"
        if runtime.SETTINGS.side == "left"
        else runtime.SETTINGS.side,
        "made by": "the dashboard's Download HTML report button",
        "command": reproduce_command(result, selection.eps, side=runtime.SETTINGS.side),
    }
    return html_report(result, selection.eps, provenance=provenance, settings=settings)


def report_download(selection: Selection, models: Sequence[ModelResult]) -> None:
    """Sidebar buttons downloading :func:`report_json` and :func:`report_html` (each built only when clicked)."""
    resolver, fingerprints = runtime.resolver(), runtime.spectrum_cache().fingerprints
    with st.sidebar:
        st.download_button(
            "Download JSON report",
            lambda: report_json(selection, models),
            file_name="weight-spectrum-report.json",
            mime="application/json",
            key="report_json",
            on_click="ignore",
            help=f"Every matrix of every fine-tune, intruder counts among the top {selection.k} at "
            "ε = 0.10 … 0.90 (the format of python -m analysis report).",
        )
        st.download_button(
            "Download HTML report",
            lambda: report_html(selection, models, resolver, fingerprints.digest),
            file_name="weight-spectrum-report.html",
            mime="text/html",
            key="report_html",
            on_click="ignore",
            help=f"One file that opens offline in any browser (about 5 MB, most of it plotly.js): the overview, "
            f"intruders vs ε, effective rank, the matrices that changed most and the totals at top {selection.k}, "
            f"ε = {selection.eps:g}, with the models' stored dtypes and content digests (python -m analysis report "
            "--html).",
        )


def demo_build_status() -> None:
    """The offline demo's build, if one is running: a progress bar and Cancel (the
    fine-tunes done so far stay), refreshed every second; the page is redrawn when a
    fine-tune is published, so its results show at once."""
    job = demo_build.demo_job()
    if job is None or job.state.finished:
        return
    manifest, _ = demo_build.demo_state()
    st.session_state.wse_demo_ready = len(manifest.fine_tunes) if manifest is not None else 0
    _demo_build_status()


@st.fragment(run_every=POLL_SECONDS)
def _demo_build_status() -> None:
    from demo import FINE_TUNES

    job = demo_build.demo_job()
    manifest, _ = demo_build.demo_state()
    ready = len(manifest.fine_tunes) if manifest is not None else 0
    if job is None or job.state.finished or ready != st.session_state.get("wse_demo_ready"):
        st.rerun()
    p = job.progress
    names = [r.label for r in FINE_TUNES]
    done = f"{ready} of {len(names)} fine-tunes ready"
    if p is None or not p.total:
        st.progress(0.0, text=f"Building the offline demo ({done}): reading the task and scoring the base…")
    else:
        eta = f", about {p.eta_s / 60:.0f} min left" if p.eta_s is not None and p.eta_s >= 60 else ""
        training = names[min(ready, len(names) - 1)]
        st.progress(p.fraction, text=f"Building the offline demo ({done}); training {training}{eta}")
    st.button(
        "Stop building the demo",
        key="cancel_demo",
        on_click=demo_build.cancel_demo_build,
        help="Keeps the fine-tunes trained so far; the Models page can resume the build.",
    )
