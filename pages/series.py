"""Checkpoint series: watch a fine-tune happen, step by step (analysis.specs.series).

Select the series, start (or join) one job per checkpoint, then show its metrics against
training step, a layer x module grid with a step slider and one matrix's similarity
heatmap across steps.
"""

from __future__ import annotations

import streamlit as st

from analysis.errors import InputError
from analysis.specs import DEMO_PREFIX
from analysis.specs.series import SERIES_PREFIX, checkpoint_folders, demo_checkpoint_root, is_series_spec
from charts import rl_measures, series, series_tables, table_words
from hosting.jobs import JobState
from ui import demo_build, runtime, state, views
from ui.text import escape_markdown

state.ensure_app_navigation()
selection = state.current()
resolver = runtime.resolver()

st.title("Checkpoint series")
st.caption(
    "One fine-tune at each checkpoint its training saved, every checkpoint compared with the base. Intruder "
    "dimensions appear during training and grow with it (Shuttleworth et al. 2024, sec. 5); the update's rank "
    "grows with data (Biderman et al. 2024, Fig. 6). Each checkpoint is analysed once and cached: adding one "
    "to a series costs only that checkpoint."
)
series_specs = [t for t in selection.tuned if is_series_spec(t)]


def demo_series() -> list[str]:
    """The demo's checkpoint series, where the selection's base is the demo's base."""
    manifest, _ = demo_build.demo_state()
    if manifest is None or selection.base not in ("", DEMO_PREFIX + manifest.base.name):
        return []
    found = []
    for model in manifest.fine_tunes:
        try:
            if checkpoint_folders(demo_checkpoint_root(model)):
                found.append(SERIES_PREFIX + DEMO_PREFIX + model.name)
        except (OSError, InputError):
            pass
    return found


def watch(spec: str) -> None:
    base, _ = runtime.demo_defaults()
    state.set("base", selection.base or base)
    state.set("tuned", [*selection.tuned, spec])
    state.set("series", spec)


if not selection.base or not series_specs:
    st.info("Add a checkpoint series as a fine-tune first: a training output folder, hub revisions or uploads.")
    offered = demo_series()
    if offered:  # the demo saved checkpoints while it trained: one click from here
        st.caption("Or watch one of the built-in demo's fine-tunes train:")
        for col, spec in zip(st.columns(len(offered)), offered, strict=True):
            label = escape_markdown(resolver.label(spec))
            col.button(label, key=f"watch_{spec}", on_click=watch, args=(spec,), icon=":material/timeline:")
    st.page_link(views.MODELS_PAGE, label="Choose models", icon=":material/folder_open:")
    st.stop()
with st.sidebar:
    spec = state.widget(st.selectbox, "Series", "series", options=series_specs, format_func=resolver.label)
try:
    found = runtime.series(spec)
except InputError as exc:
    st.error(f"**{escape_markdown(resolver.label(spec))}**: {escape_markdown(runtime.friendly(str(exc), spec=spec))}")
    st.stop()

tracked = runtime.track_series(selection.base, found, start=True)
for t in tracked:
    if t.state is JobState.FAILED:
        error = runtime.friendly(t.job.error or "", t.label, spec=t.spec)
        st.error(f"**{escape_markdown(t.label)}** could not be analysed: {escape_markdown(error)}")
views.progress(selection.base, tracked)
done = sum(t.state is JobState.DONE for t in tracked)
st.caption(
    f"**{escape_markdown(found.label)}**: {done} of {len(tracked)} checkpoints analysed · steps "
    + ", ".join(str(s) for s in found.steps)
)
models = [r for r in (t.result() for t in tracked) if r is not None and r.matrices]
if not models:
    st.caption("The first results appear here as soon as they are computed.")
    st.stop()
k, eps = views.k_eps_controls(models)
views.report_download(selection, models)

st.subheader("Against training step")
by = state.widget(
    st.radio,
    "Lines",
    "lines",
    default="model",
    options=list(series_tables.SERIES_GROUPINGS),
    horizontal=True,
    format_func=lambda by: series_tables.GROUPING_WORDS[by].capitalize(),
)
trend = series_tables.series_table(models, k, eps, by)
views.chart(series.series_trend_figure(trend, by, found.label), "series-trends")
views.table(trend, "series-trends", words=table_words.GROUP_COLUMN_WORDS)  # each row a group
with st.expander("RL vs SFT measures against training step (update sparsity, rotation, mask overlap)"):
    views.chart(rl_measures.series_rl_figure(trend, by, found.label), "series-rl-measures")

st.subheader("Layer × module, step by step")
metric = state.widget(
    st.radio,
    "Measure",
    "grid",
    default="intruders",
    options=list(series_tables.SERIES_METRICS),
    horizontal=True,
    format_func=series_tables.SERIES_METRICS.get,
)
steps = [m.step for m in series_tables.by_step(models) if m.step is not None]
# The one step control of the page: both step-by-step charts show this step; a link's
# step not analysed yet shows the last one so far, and stays in the link.
wanted = state.get("step")
step = state.widget(
    st.select_slider, "Training step", "step", default=steps[-1], options=steps,
    shown=steps[-1] if wanted is not None and wanted not in steps else None,
) if len(steps) > 1 else (steps[0] if steps else None)  # fmt: skip
grid = series_tables.series_grid_table(models, metric, k, eps)
views.chart(series.series_grid_figure(grid, metric, found.label, step=step), "series-grid")
views.table(grid, "series-grid")

st.subheader("One matrix across steps")
matrix = views.matrix_control(models)
views.chart(series.series_similarity_figure(models, matrix, found.label, step=step), "series-similarity")
views.table(series_tables.series_similarity_table(models, matrix, k, eps), "series-similarity")
