"""Singular-vector similarity: |Ut^T U0| for one matrix, intruder rows marked."""

from __future__ import annotations

import streamlit as st

from charts import matrix_tables, spectra, tables
from charts.table_words import MEASURES
from ui import views
from ui.text import escape_markdown

st.title("Singular-vector similarity")
selection, models = views.results()
model = views.model_control(models)
name = views.matrix_control(models)
k, eps = views.k_eps_controls(models)
views.report_download(selection, models)

label = tables.model_labels(models)[models.index(model)]
st.caption(
    "Left: |cosine| between the top tuned and the top base left singular vectors (Shuttleworth et al. 2024, "
    "Fig. 1/3): a clean diagonal means fine-tuning kept the base's directions. Right: each tuned vector's best "
    "match over **all** base vectors; a bar left of the ε line is an intruder dimension (red in both panels)."
)
matrix = views.find_matrix(model, name)
if matrix is None:
    st.info(
        f"{escape_markdown(name)} was not analysed for {escape_markdown(label)} "
        "(an adapter only changes the modules it targets)."
    )
    st.stop()
views.chart(spectra.similarity_figure(matrix, k, eps, label=label), f"similarity-{matrix.key}")

intr = matrix_tables.intruder_table(matrix, k, eps)
c1, c2, c3 = st.columns(3)
c1.metric("Intruder dimensions", int(intr["intruder"].sum()), help=f"among the top {len(intr)} at ε = {eps:g}")
c2.metric("Effective rank of ΔW", MEASURES["effective_rank"].text(matrix.effective_rank))
c3.metric("rank90 of ΔW", matrix.rank90)
views.table(intr, f"intruders-{matrix.key}")
with st.expander(f"Similarity matrix as numbers ({matrix.similarity.shape[0]} × {matrix.similarity.shape[1]})"):
    views.table(matrix_tables.similarity_table(matrix), f"similarity-{matrix.key}", index=True)
