"""Subspace similarity between two updates of the same matrix (Hu et al. 2021, sec. 7)."""

from __future__ import annotations

import streamlit as st

from charts import comparison, matrix_tables, spectra, tables
from charts.table_words import MEASURES
from ui import state, views
from ui.text import escape_markdown

st.title("Subspace similarity")
selection, models = views.results()
st.caption(
    "Do two fine-tunes change the same matrix in the same directions? Each cell compares the top-i directions of "
    "one update ΔW with the top-j of the other: 1 where one set of directions contains the other, near 0 for "
    "unrelated ones (about i·j/(min(i, j)·d) for random directions in d dimensions). The measure is Hu et al. "
    "2021's (sec. 7, eq. 4), φ(i, j) = ‖PᵢᵀQⱼ‖²_F / min(i, j), here on the **left singular vectors of ΔW** of "
    "each fine-tune (works for any pair, LoRA or full; the LoRA paper used the right singular vectors of the A "
    "factors). Directions past an update's numerical rank are left out."
)
if len(models) < 2:
    # No matrix choice here: with one fine-tune it would change nothing on this page.
    st.info("Subspace similarity compares two fine-tunes: add another one on the Models page.")
else:
    # Open on two adapters of different rank, as in Hu et al., unless a second fine-tune
    # was chosen already (here or by the link this session was opened with).
    pair = matrix_tables.subspace_default_pair(models)
    if pair is not None and not st.session_state.get("sel_other"):
        state.set("model", models[pair[0]].source)
        state.set("other", models[pair[1]].source)
    first = views.model_control(models, "First fine-tune", "model")
    second = views.model_control([m for m in models if m is not first], "Second fine-tune", "other")
    name = views.matrix_control([first, second])
    labels = dict(zip((m.source for m in models), tables.model_labels(models), strict=True))
    a, b = views.find_matrix(first, name), views.find_matrix(second, name)
    if a is None or b is None:
        missing = labels[first.source] if a is None else labels[second.source]
        st.info(
            f"{escape_markdown(name)} was not analysed for {escape_markdown(missing)}; "
            "choose a matrix both fine-tunes changed."
        )
    else:
        phi = matrix_tables.subspace_similarity(a, b)
        views.chart(spectra.subspace_figure(phi, labels[first.source], labels[second.source], name), f"subspace-{name}")
        if phi.size:
            c1, c2 = st.columns(2)
            c1.metric("φ(1, 1): top directions", MEASURES["phi"].text(phi[0, 0]))
            c2.metric(f"φ({phi.shape[0]}, {phi.shape[1]})", MEASURES["phi"].text(phi[-1, -1]))
        with st.expander("φ(i, j) as numbers"):
            views.table(matrix_tables.phi_table(phi), f"subspace-{name}", index=True)

views.report_download(selection, models)

st.subheader("Amplification factor")
st.caption(
    "‖ΔW‖_F / ‖Uᵀ W₀ V‖_F with U, V the top-r singular vectors of ΔW (Hu et al. 2021, sec. 7.3; r = the LoRA "
    "rank, or rank90 for a full fine-tune): how strongly the update amplifies directions the base weight "
    "barely uses."
)
amp_log = state.widget(st.toggle, "Log scale", "logamp", default=True, help="Factors often span decades.")
views.chart(comparison.amplification_figure(models, log_y=amp_log), "amplification")
views.table(tables.amplification_table(models), "amplification")
