"""Overview: layer-by-module grids of intruder dimensions and update rank, per fine-tune."""

from __future__ import annotations

import streamlit as st

from charts import overview, overview_tables, rl_tables, tables
from ui import state, views
from ui.text import escape_markdown

SIMILARITY_PAGE = "pages/similarity.py"

state.ensure_app_navigation()
goto = st.session_state.pop("wse_goto", None)
if goto:
    st.switch_page(goto)

st.title("Overview")
selection, models = views.results()
k, eps = views.k_eps_controls(models)
views.report_download(selection, models)

st.caption(
    "Each cell is one weight matrix of one fine-tune. **Intruder dimensions** (Shuttleworth et al. 2024): "
    f"among the top {k} singular vectors of the tuned matrix, those whose best |cosine| with every base "
    f"singular vector is below ε = {eps:g}. **Effective rank** (Roy & Vetterli 2007) and **rank90** "
    "(Biderman et al. 2024) measure how many directions the update ΔW uses. Click a cell to open its matrix."
)

metric = state.widget(
    st.segmented_control,
    "Colour by",
    "metric",
    default="intruders",
    options=list(overview_tables.OVERVIEW_METRICS),
    format_func=overview_tables.OVERVIEW_METRICS.get,
)
metric = metric or "intruders"
specs = [m.source for m in models]


def open_matrix(index: int, matrix: str) -> None:
    """A click on a grid cell opens that matrix on the similarity page."""
    state.set("model", specs[index])
    state.set("matrix", matrix)
    st.session_state.wse_goto = SIMILARITY_PAGE


st.subheader(overview.overview_title(metric, k, eps))
if metric in rl_tables.RL_MEANINGS:  # the RL-versus-SFT measures are not in the caption above
    st.caption(f"Each cell: {rl_tables.RL_MEANINGS[metric]}. The **RL vs SFT** page compares them per fine-tune.")
views.overview_grids(models, metric, k, eps, on_open=open_matrix)

with st.expander("Open a matrix (without clicking the grid)"):
    labels = dict(zip(specs, tables.model_labels(models), strict=True))
    c1, c2, c3 = st.columns([2, 3, 1], vertical_alignment="bottom")
    spec = c1.selectbox("Fine-tune", specs, format_func=labels.get, key="overview_open_model")
    chosen = next(m for m in models if m.source == spec)
    by_key = {m.key: m for m in tables.identity_order(chosen.matrices)}
    name = c2.selectbox(
        "Matrix",
        list(by_key),
        format_func=lambda key: f"{tables.describe_matrix(by_key[key])} ({by_key[key].name})",
        key="overview_open_matrix",
    )

    def open_selected() -> None:
        state.set("model", st.session_state.overview_open_model)
        state.set("matrix", st.session_state.overview_open_matrix)
        st.session_state.wse_goto = SIMILARITY_PAGE

    c3.button("Open", on_click=open_selected, key="overview_open")

st.subheader("Per fine-tune totals")
views.chart(overview.totals_figure(models, k, eps), "overview-totals")
views.table(tables.totals_table(models, k, eps), "totals")

with st.expander("Every matrix of every fine-tune"):
    views.table(tables.matrix_table(models, k, eps), "matrices")
    for model, label in zip(models, tables.model_labels(models), strict=True):
        if model.unmatched or model.shape_mismatches:
            st.caption(
                f"{escape_markdown(label)}: {len(model.unmatched)} tensor(s) present on one side only and "
                f"{len(model.shape_mismatches)} shape mismatch(es) were not analysed."
            )
