"""Spectrum: singular values of base, tuned and update for one matrix, intruders marked."""

from __future__ import annotations

import streamlit as st

from charts import matrix_tables, spectra, tables
from charts.table_words import MEASURES
from ui import views
from ui.text import escape_markdown

st.title("Spectrum")
selection, models = views.results()
model = views.model_control(models)
name = views.matrix_control(models)
k, eps = views.k_eps_controls(models)
views.report_download(selection, models)

label = tables.model_labels(models)[models.index(model)]
st.caption(
    "Singular values of the base weight W₀, the tuned weight Wₜ and the update ΔW (log scales). Red crosses "
    f"mark intruder dimensions among the top {k} tuned vectors at ε = {eps:g}, at the rank where they sit: "
    "LoRA's intruders are typically among the largest singular values (Shuttleworth et al. 2024, Fig. 2)."
)
matrix = views.find_matrix(model, name)
if matrix is None:
    st.info(
        f"{escape_markdown(name)} was not analysed for {escape_markdown(label)} "
        "(an adapter only changes the modules it targets)."
    )
    st.stop()
views.chart(spectra.spectrum_figure(matrix, k, eps, label=label), f"spectrum-{matrix.key}")
c1, c2, c3, c4 = st.columns(4)
c1.metric("‖ΔW‖_F", MEASURES["delta_fro"].text(matrix.delta_fro))
c2.metric("Stable rank of ΔW", MEASURES["stable_rank"].text(matrix.stable_rank))
c3.metric("Effective rank of ΔW", MEASURES["effective_rank"].text(matrix.effective_rank))
c4.metric("rank90 of ΔW", matrix.rank90)
views.table(matrix_tables.spectrum_table(matrix), f"spectrum-{matrix.key}")
